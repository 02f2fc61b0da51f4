"""The ``"all_gather"`` strategy: gather the keys and values, attend the local queries.

Dilated attention exchanges only the key/value rows a rank's queries attend (LongNet's sparse
all-gather, ``sparse_all_gather``). Dense and block-sparse attention all-gather K and V (one
collective, K and V side by side) and compute each rank's query rows with the pattern's op on a
key window of the global sequence:

- causal: the rows ``[qa, qb)`` are the last rows of the prefix ``[0, qb)``; blocks start at 0
  in both, and a causal row's random blocks are drawn from the blocks up to its own, so the op
  on the prefix gives exactly the global rows;
- non-causal dense: every key.

Non-causal block-sparse raises: random blocks are drawn from all blocks of the sequence and the
global rows see every key, so use ``strategy="all_to_all"``.

Per-rank traffic (bytes), dense and block-sparse: received ``(W - 1) * c * B * Hkv * (D + Dv) *
itemsize`` forward (``c`` = positions per rank, padded: ``ceil(N/W)``, zigzag ``2 *
ceil(N/2W)``), the same in the backward's reduce-scatter. Dilated: see ``sparse_all_gather``
(it does not grow with ``N`` for fixed configs).
"""
from __future__ import annotations

import torch

from .collectives import all_gather_sequence, pad_dim
from .plan import Plan, connected_zero, pattern_attention
from .sparse_all_gather import sparse_all_gather_attention


def check_all_gather(plan: Plan) -> None:
    if plan.kind == "block_sparse" and not plan.is_causal:
        raise ValueError(
            "sequence_parallel(strategy='all_gather') computes block-sparse attention only when "
            "causal: non-causal random blocks are drawn from all blocks of the sequence and global "
            "rows see every key, so no key window gives a rank's rows exactly; use "
            "strategy='all_to_all' or 'ring' (or 'auto')"
        )


def _mask_rows(mask: torch.Tensor | None, start: int, length: int) -> torch.Tensor | None:
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask.narrow(-2, start, length)


def all_gather_attention(
    plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """This rank's attention rows. Shapes: q ``[B, Hq, n_r, D]``, k ``[B, Hkv, n_r, D]``, v
    ``[B, Hkv, n_r, Dv]``, attn_mask ``[B or 1, Hq or 1, n_r or 1, N]`` or None -> ``[B, Hq, n_r,
    Dv]``."""
    check_all_gather(plan)
    if plan.kind == "dilated":
        return sparse_all_gather_attention(plan, q, k, v, attn_mask)
    d = k.shape[-1]
    kv = all_gather_sequence(torch.cat([k, v], dim=-1), plan.group, plan.n, plan.world,
                             plan.layout, plan.rank, 2)
    keys, values = kv[..., :d], kv[..., d:]
    outs, row = [], 0
    for qa, qb in plan.ranges():
        rows = qb - qa
        if rows == 0:
            continue
        qc, mc = q.narrow(2, row, rows), _mask_rows(attn_mask, row, rows)
        row += rows
        start, end = (0, qb) if plan.is_causal else (0, plan.n)
        if plan.kind == "dense" and not plan.is_causal:
            padded = qc  # dense non-causal rows do not depend on their positions
        else:
            padded = pad_dim(qc, 2, end - qa)
            if mc is not None and mc.shape[-2] != 1:
                fill = True if mc.dtype == torch.bool else 0.0
                mc = torch.cat([mc, mc.new_full((*mc.shape[:-2], end - qb, mc.shape[-1]), fill)], dim=-2)
        if mc is not None:
            mc = mc[..., start:end]
        out, _ = pattern_attention(plan.spec, padded, keys[:, :, start:end], values[:, :, start:end],
                                   plan.is_causal, plan.scale, mc)
        outs.append(out[:, :, :rows])
    if not outs:
        # A rank with no rows keeps the gathered keys in its graph all the same: the backward's
        # reduce-scatter is a collective every rank must join.
        return q.new_zeros(*q.shape[:3], v.shape[-1]) + connected_zero(q, kv)
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
