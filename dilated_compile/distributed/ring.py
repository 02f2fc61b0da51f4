"""The ``"ring"`` strategy (ring attention): dense and block-sparse attention.

The ranks pass key/value chunks around the ring (``dist.batch_isend_irecv``, the next chunk in
flight while the current one is computed); each rank attends its query ranges to each chunk and
merges the partial results by their log-sum-exp. The schedule (``ring_schedule``, the same on
every rank) decides from the plan which (query range, key range) pairs a step computes — pairs
that the causal mask or the block layout removes entirely are skipped (the zigzag layout gives
every rank the same causal work) — and which rows a hop carries: only the rows that a rank still
ahead needs, so a block-sparse pattern's empty blocks are never sent. Dense attention is the
case where every block is kept. The backward passes the chunks around again, with the gradients
of their rows gathered behind them, and computes each pair's gradients with the op's backward
from the merged output and lse (FlashAttention-2 style: exact for a part of the keys).

Per-rank traffic of rank ``r`` (bytes received; ``e = B * Hkv * (D + Dv)``, ``s`` the itemsize,
``a`` the gradients' itemsize: 4, 8 for float64; ``n_r`` rank ``r``'s positions; ``|S_t(s)|``
the rows of rank ``s`` that ranks ``s + t .. s + W - 1`` attend, ``|G_t(s)|`` those that ranks
``s + 1 .. s + t`` attend, at block granularity: ``ring_schedule`` defines them):

- forward: ``sum_{t=1}^{W-1} |S_t(r - t)| * e * s``; dense non-causal: ``(N - n_r) * e * s``;
- backward: the same again, plus ``sum_{t=1}^{W-1} |G_t(r - 1 - t)| * e * a`` for the gradients;
  dense non-causal: ``(N - n_{r-1}) * e * a``.

A local band of ``l`` blocks of ``bs`` on the contiguous layout (ranges longer than the band)
moves at most ``W * l * bs`` rows per rank instead of ``N - n_r``: a rank needs ``l`` blocks of
each neighbour, and those of the next rank travel the ring the long way round. Dilated ring
attention raises (``all_gather`` computes it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops._numerics import lse_dtype
from .collectives import count_received
from .errors import named_collective
from .group import global_rank
from .plan import Plan
from .ring_schedule import Schedule, Step, schedule


def check_ring(plan: Plan) -> None:
    if plan.kind == "dilated":
        raise ValueError(
            "sequence_parallel(strategy='ring') computes dense and block-sparse attention, not "
            "dilated attention; use strategy='all_gather' or 'all_to_all' (or 'auto')"
        )


_RING = "sequence_parallel: the ring's exchange with the neighbouring ranks (strategy 'ring')"


def _exchange(plan: Plan, send: torch.Tensor, rows: int) -> tuple[torch.Tensor, list, object]:
    """Post: send ``send`` to the next rank, receive ``rows`` rows (dim 2; the other dims as
    ``send``'s) from the previous rank into a new buffer. An empty message is not posted: both
    of its ends know its size from the schedule."""
    shape = list(send.shape)
    shape[2] = rows
    receive = send.new_empty(shape)
    count_received("ring", receive.numel() * receive.element_size())
    nxt, prev = (plan.rank + 1) % plan.world, (plan.rank - 1) % plan.world
    ops = []
    if send.shape[2]:
        ops.append(dist.P2POp(dist.isend, send, global_rank(plan.group, nxt), plan.group))
    if rows:
        ops.append(dist.P2POp(dist.irecv, receive, global_rank(plan.group, prev), plan.group))
    with named_collective(_RING, plan.group):
        requests = dist.batch_isend_irecv(ops) if ops else []
    return receive, requests, plan.group


def _wait(pending: tuple[torch.Tensor, list, object]) -> torch.Tensor:
    received, requests, group = pending
    with named_collective(_RING, group):  # a neighbour that died fails here, named
        for request in requests:
            request.wait()
    return received


def _pass_on(plan: Plan, step: Step, kv: torch.Tensor):
    """Post the step's hop: the rows of the held chunk that ranks ahead still need."""
    send = kv if step.send is None else kv.index_select(2, step.send)
    return _exchange(plan, send, step.receive_rows)


def _add_rows(acc: torch.Tensor, index: torch.Tensor | None, rows: torch.Tensor) -> None:
    if index is None:
        acc += rows
    else:
        acc.index_add_(2, index, rows)


def _merge(acc, lse, rows: slice, out_c, lse_c) -> None:
    """Fold one pair's (out, lse) into the rows' running (out, lse) by log-sum-exp."""
    out_c, lse_c = out_c.to(acc.dtype), lse_c.to(lse.dtype)
    old = lse[:, :, rows]
    new = torch.logaddexp(old, lse_c)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    acc[:, :, rows] = (acc[:, :, rows] * torch.exp(old - safe).unsqueeze(-1)
                       + out_c * torch.exp(lse_c - safe).unsqueeze(-1))
    lse[:, :, rows] = new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, plan: Plan, ring: Schedule):
        d = k.shape[-1]
        kv = torch.cat([k, v], dim=-1)  # the chunk held, [B, Hkv, rows, D + Dv]
        cdtype = lse_dtype(q.dtype)
        acc = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=cdtype)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=cdtype)
        for t, step in enumerate(ring.steps):
            pending = _pass_on(plan, step, kv) if t < plan.world - 1 else None
            for pair in step.pairs:
                _merge(acc, lse, pair.rows, *pair.forward(plan, q, kv, d, attn_mask))
            if pending is not None:
                kv = _wait(pending)
        out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.plan, ctx.ring = plan, ring
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        plan: Plan = ctx.plan
        d = k.shape[-1]
        kv = torch.cat([k, v], dim=-1)
        cdtype = lse_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q, dtype=cdtype)
        own = torch.zeros_like(kv, dtype=cdtype)  # the gradient of the rank's own rows
        incoming = None  # the gathered gradient of the chunk the next step holds, in flight
        for t, step in enumerate(ctx.ring.steps):
            pending = _pass_on(plan, step, kv) if t < plan.world - 1 else None
            acc = own if t == 0 else kv.new_zeros(*kv.shape[:2], step.acc_rows, kv.shape[3], dtype=cdtype)
            for pair in step.pairs:
                pair.backward(plan, grad_out, q, kv, d, out, lse, attn_mask, dq, acc)
            if t > 0:
                if incoming is not None:
                    _add_rows(acc, step.carry, _wait(incoming))
                # Pass the chunk's gradient on behind it; after the last step it reaches its owner.
                incoming = _exchange(plan, acc, step.acc_receive_rows)
            if pending is not None:
                kv = _wait(pending)
        if incoming is not None:
            _add_rows(own, ctx.ring.own, _wait(incoming))
        return dq.to(q.dtype), own[..., :d].to(k.dtype), own[..., d:].to(v.dtype), None, None, None


def ring_attention(
    plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """This rank's dense or block-sparse attention rows. Shapes: q ``[B, Hq, n_r, D]``, k ``[B,
    Hkv, n_r, D]``, v ``[B, Hkv, n_r, Dv]``, attn_mask ``[B or 1, Hq or 1, n_r or 1, N]`` or None
    -> ``[B, Hq, n_r, Dv]``."""
    check_ring(plan)
    return _RingAttention.apply(q, k, v, attn_mask, plan, schedule(plan, q.shape[1], q.device))
