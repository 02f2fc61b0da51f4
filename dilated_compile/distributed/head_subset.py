"""Dilated attention of some of the heads over the whole sequence, each head with the dilation
offsets of its index in the whole (what the ``"all_to_all"`` strategy computes on a rank).

The dilated op gives head ``h`` of the tensors it is handed the offsets of ``h``: on a rank's
heads ``[a, a + h_r)`` that is right only when ``a`` is a multiple of every rate (``mixture``)
and never for ``head_groups``, whose groups the op would cut from the rank's heads alone. Here each
(config, offset) part of the *whole* head set (``ops._pattern.head_parts``) that meets the rank's
heads runs on its rows alone: under config ``(w, r)`` (``w' = min(w, N)``) the rows whose local
index ``j = p mod w'`` has ``j mod r == o``, taken in order, form a sequence whose segments all
hold ``ceil((w' - o) / r)`` rows but the last, and attend exactly within those segments (causal:
order is kept), so the op with that one segment length and rate 1 computes them exactly. The
configs' partial results of a row merge by their log-sum-exp (``merge.merge_by_lse``; for
``head_groups`` each head has one part). Cost: one op call per part that meets the heads, and a
copy of the part's rows.
"""

from __future__ import annotations

import torch

from ..ops import dilated_attention_op
from ..ops._block_layout import EagerCache
from ..ops._numerics import lse_dtype
from ..ops._pattern import head_parts
from ..spec import DilatedSpec
from .merge import merge_by_lse
from .plan import connected_zero
from .sparse_all_gather import kv_heads_of


def dilated_head_subset_attention(
    spec: DilatedSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_lo: int,
    q_heads: int, is_causal: bool, scale: float | None, attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query heads ``[head_lo, head_lo + h)`` of ``q_heads`` over the whole sequence.

    Shapes: q ``[B, h, N, D]``, k ``[B, hk, N, D]``, v ``[B, hk, N, Dv]`` (``h % hk == 0``; local
    query head ``i`` reads local kv head ``i // (h // hk)``), attn_mask None or ``[B or 1, h or 1,
    N or 1, N]`` (bool or float, as in SDPA) -> ``[B, h, N, Dv]``, equal to those heads of
    ``spec``'s attention over all ``q_heads`` heads."""
    batch, heads, n, _ = q.shape
    dv = v.shape[-1]
    cdtype = lse_dtype(q.dtype)
    # Per config, its partial result of every (head, row), flattened head-major.
    outs = [q.new_zeros(batch, heads * n, dv, dtype=cdtype) for _ in spec.segment_lengths]
    lses = [q.new_full((batch, heads * n), float("-inf"), dtype=cdtype) for _ in spec.segment_lengths]
    for part in head_parts(spec.segment_lengths, spec.dilation_rates, spec.mode, q_heads):
        members = torch.arange(q_heads)[part.heads]
        local = members[(members >= head_lo) & (members < head_lo + heads)] - head_lo
        w = min(part.segment_length, n)
        r, o = part.dilation_rate, part.offset
        positions = _positions(n, w, r, o, q.device)
        if local.numel() == 0 or positions.numel() == 0:
            continue
        op_kv, _ = kv_heads_of(local, heads, k.shape[1])
        local, op_kv = local.to(q.device), op_kv.to(q.device)
        rows = [x.index_select(1, index).index_select(2, positions)
                for x, index in ((q, local), (k, op_kv), (v, op_kv))]
        mask = None if attn_mask is None else _part_mask(attn_mask, local, positions)
        out, lse = dilated_attention_op(*rows, [-(-(w - o) // r)], [1], "mixture", is_causal, scale, mask)
        targets = (local.unsqueeze(1) * n + positions).flatten()
        i = part.config_index
        outs[i] = outs[i].index_copy(1, targets, out.flatten(1, 2).to(cdtype))
        lses[i] = lses[i].index_copy(1, targets, lse.flatten(1, 2).to(cdtype))
    merged = merge_by_lse(torch.stack(outs, dim=1), torch.stack(lses, dim=1))  # [B, h * N, Dv]
    # Connected even when no part meets a row of these heads (few positions, large offsets).
    return merged.view(batch, heads, n, dv).to(q.dtype) + connected_zero(q, k, v)


# Built once per call class in eager (no host work or copy on later calls); under tracing the
# positions are graph ops, never a cached trace tensor.
_POSITIONS = EagerCache(64)


def _positions(n: int, w: int, r: int, o: int, device: torch.device) -> torch.Tensor:
    """The positions of ``[0, n)`` whose local index (segments of ``w``) is ``o`` mod ``r``, on
    ``device``."""
    def build() -> torch.Tensor:
        positions = torch.arange(n)
        return positions[positions % w % r == o].to(device)

    return _POSITIONS.get((n, w, r, o, device), None, build)


def _part_mask(mask: torch.Tensor, heads: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A part's entries of ``mask``: its heads, rows and columns (broadcast dims stay 1)."""
    if mask.shape[1] != 1:
        mask = mask.index_select(1, heads)
    if mask.shape[2] != 1:
        mask = mask.index_select(2, positions)
    return mask.index_select(3, positions)
