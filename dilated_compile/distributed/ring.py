"""The ``"ring"`` strategy (ring attention), dense attention only.

The ranks pass their key/value blocks around the ring (``dist.batch_isend_irecv``, the next
block in flight while the current one is computed); each rank attends its query ranges to each
block and merges the partial results by their log-sum-exp. Causal pairs of ranges that the
causal mask removes entirely are skipped (the zigzag layout gives every rank the same work). The
backward passes the key/value blocks around again, with their gradient accumulators behind them,
and computes each pair's gradients with the op's backward from the merged output and lse
(FlashAttention-2 style: exact for a block of the keys).

Per-rank traffic (bytes): forward ``(W - 1) * c * B * Hkv * (D + Dv) * itemsize`` received;
backward the same for the blocks plus ``W * c * B * Hkv * (D + Dv) * 4`` (float32 gradient
accumulators; 8 for float64); ``c``: padded positions per rank. Block-sparse and dilated ring
attention raise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import dilated_attention_backward_op
from ..ops._numerics import lse_dtype
from .collectives import count_received, pack_ranges, pad_dim, unpack_ranges
from .group import global_rank
from .layout import chunk_size
from .plan import Plan, dense_attention


def check_ring(plan: Plan) -> None:
    if plan.kind != "dense":
        raise ValueError(
            f"sequence_parallel(strategy='ring') computes dense attention only (plain SDPA), not "
            f"{plan.kind} attention; use strategy='all_gather' or 'all_to_all' (or 'auto')"
        )


def _pairs(plan: Plan, source: int):
    """(query rows slice, q range, key slot slice, kv range, causal) of this rank's ranges
    against ``source``'s ranges, skipping empty and fully masked pairs."""
    c = chunk_size(plan.n, plan.world, plan.layout)
    row = 0
    for qa, qb in plan.ranges():
        for index, (ka, kb) in enumerate(plan.ranges(source)):
            if qb == qa or kb == ka:
                continue
            if plan.is_causal and ka > qb - 1:
                continue  # every key after every query
            causal = plan.is_causal and kb - 1 > qa
            if causal and (qa, qb) != (ka, kb):
                raise AssertionError("ring: layouts give equal or disjoint ranges")
            yield slice(row, row + qb - qa), (qa, qb), slice(index * c, index * c + kb - ka), (ka, kb), causal
        row += qb - qa


def _mask_block(mask, rows: slice, keys: tuple[int, int]):
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    return mask[..., keys[0]:keys[1]]


def _pad_keys(q, k, v, mask):
    """The op takes no more queries than keys; a block shorter than the query rows (an uneven
    split, in a pair the causal mask does not cut) gets zero keys that the mask removes."""
    rows, keys = q.shape[2], k.shape[2]
    if rows <= keys:
        return k, v, mask
    pad = rows - keys
    k, v = pad_dim(k, 2, rows), pad_dim(v, 2, rows)
    if mask is None:
        mask = torch.arange(rows, device=q.device).view(1, 1, 1, rows) < keys
    else:
        fill = False if mask.dtype == torch.bool else float("-inf")
        mask = torch.cat([mask, mask.new_full((*mask.shape[:-1], pad), fill)], dim=-1)
    return k, v, mask


def _exchange(plan: Plan, send: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Post: send ``send`` to the next rank, receive the previous rank's into a new buffer."""
    receive = torch.empty_like(send)
    count_received("ring", receive.numel() * receive.element_size())
    nxt, prev = (plan.rank + 1) % plan.world, (plan.rank - 1) % plan.world
    ops = [dist.P2POp(dist.isend, send, global_rank(plan.group, nxt), plan.group),
           dist.P2POp(dist.irecv, receive, global_rank(plan.group, prev), plan.group)]
    return receive, dist.batch_isend_irecv(ops)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, plan: Plan):
        d = k.shape[-1]
        kv = torch.cat([pack_ranges(x, plan.n, plan.world, plan.layout, plan.rank, 2) for x in (k, v)],
                       dim=-1).contiguous()
        cdtype = lse_dtype(q.dtype)
        acc = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=cdtype)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=cdtype)
        for step in range(plan.world):
            source = (plan.rank - step) % plan.world
            pending = _exchange(plan, kv) if step < plan.world - 1 else None
            for rows, _, keys, key_range, causal in _pairs(plan, source):
                k_c, v_c, m_c = _pad_keys(q[:, :, rows], kv[:, :, keys, :d], kv[:, :, keys, d:],
                                          _mask_block(attn_mask, rows, key_range))
                out_c, lse_c = dense_attention(q[:, :, rows], k_c, v_c, causal, plan.scale, m_c)
                old = lse[:, :, rows]
                new = torch.logaddexp(old, lse_c.to(cdtype))
                safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
                acc[:, :, rows] = (acc[:, :, rows] * torch.exp(old - safe).unsqueeze(-1)
                                   + out_c.to(cdtype) * torch.exp(lse_c.to(cdtype) - safe).unsqueeze(-1))
                lse[:, :, rows] = new
            if pending is not None:
                kv, requests = pending
                for request in requests:
                    request.wait()
        out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        plan: Plan = ctx.plan
        d = k.shape[-1]
        kv = torch.cat([pack_ranges(x, plan.n, plan.world, plan.layout, plan.rank, 2) for x in (k, v)],
                       dim=-1).contiguous()
        cdtype = lse_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q, dtype=cdtype)
        incoming = None  # the accumulated gradient of the block this step holds, in flight
        for step in range(plan.world):
            source = (plan.rank - step) % plan.world
            pending = _exchange(plan, kv) if step < plan.world - 1 else None
            dkv = torch.zeros_like(kv, dtype=cdtype)
            for rows, _, keys, key_range, causal in _pairs(plan, source):
                k_c, v_c, m_c = _pad_keys(q[:, :, rows], kv[:, :, keys, :d], kv[:, :, keys, d:],
                                          _mask_block(attn_mask, rows, key_range))
                dq_c, dk_c, dv_c = dilated_attention_backward_op(
                    grad_out[:, :, rows], q[:, :, rows], k_c, v_c, out[:, :, rows], lse[:, :, rows],
                    None, [k_c.shape[2]], [1], "mixture", causal, plan.scale, m_c)
                length = key_range[1] - key_range[0]
                dq[:, :, rows] += dq_c.to(cdtype)
                dkv[:, :, keys, :d] += dk_c[:, :, :length].to(cdtype)
                dkv[:, :, keys, d:] += dv_c[:, :, :length].to(cdtype)
            if incoming is not None:
                received, requests = incoming
                for request in requests:
                    request.wait()
                dkv += received
            # Pass the block's gradient on behind the block; after the last step it reaches its owner.
            incoming = _exchange(plan, dkv) if plan.world > 1 else None
            if pending is not None:
                kv, requests = pending
                for request in requests:
                    request.wait()
        if incoming is not None:
            dkv, requests = incoming
            for request in requests:
                request.wait()
        dk = unpack_ranges(dkv[..., :d], plan.n, plan.world, plan.layout, plan.rank, 2)
        dv = unpack_ranges(dkv[..., d:], plan.n, plan.world, plan.layout, plan.rank, 2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def ring_attention(
    plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """This rank's dense attention rows. Shapes: q ``[B, Hq, n_r, D]``, k ``[B, Hkv, n_r, D]``, v
    ``[B, Hkv, n_r, Dv]``, attn_mask ``[B or 1, Hq or 1, n_r or 1, N]`` or None -> ``[B, Hq, n_r,
    Dv]``."""
    check_ring(plan)
    return _RingAttention.apply(q, k, v, attn_mask, plan)
