"""The exact PyTorch implementation of dilated attention (every device), as the opaque ops
``dilated_compile::dilated_attention_pytorch`` and ``dilated_compile::dilated_attention_backward_pytorch``.

The public ops (``dilated_attention.py``) call these wherever the Triton kernels do not run: on
CPU, for float64, for head dims the kernels are not built for.

Semantics (docs/usage.md): with c[p, t] the number of configs under which query p
attends key t,

    out_p = sum_t c[p,t] exp(s_pt) v_t / sum_t c[p,t] exp(s_pt),   lse_p = log sum_t c[p,t] exp(s_pt)

which is LongNet's merge of per-config attention by softmax denominators. The implementation
below computes it that way: for each (config, offset) it attends over the dilated rows of each
segment (a strided view, cost O(N * w / r^2) per head slice, no N x N tensor), and merges the
result into a running output by log-sum-exp. The backward is FlashAttention-2 style: with the
*final* lse and Delta = rowsum(dO * O), each config's share of the gradient is independent, so
the configs are walked again and their dq/dk/dv summed.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_op_args
from ._numerics import lse_dtype, resolve_scale
from ._pattern import dilated_view, head_parts, kv_head_index, segment_blocks

# Scores of one chunk (several segments, or some query rows of one segment) stay below this many
# elements (64 MiB in float32), so memory stays linear in N whatever the segment length.
_MAX_SCORE_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """Segments ``segments`` of a tile, query rows ``queries`` of each, against key rows
    ``keys`` (the rows at or before the last query when causal, else all)."""

    segments: slice
    queries: slice
    keys: slice


class _Tile:
    """One (config, offset) head slice over one block of segments: views of the inputs and of
    the per-row buffers at the dilated rows, cut into chunks whose scores stay below
    ``_MAX_SCORE_ELEMENTS`` (by segments, and by query rows when one segment is too large)."""

    def __init__(self, part, block, batch: int, q_heads: int, kv_heads: int):
        self.part, self.block = part, block
        self.kv_heads = kv_head_index(part.heads, q_heads, kv_heads)
        self.batch_heads = batch * len(range(*part.heads.indices(q_heads)))
        self.num_rows = len(range(part.offset, block.segment_length, part.dilation_rate))

    def _view(self, x: Tensor, kv: bool) -> Tensor:
        if not kv:
            heads = self.part.heads
        elif isinstance(self.kv_heads, slice):
            heads = self.kv_heads
        else:  # GQA: view every kv head; kv_rows/add_kv pick them per query head
            heads = slice(None)
        return dilated_view(x, heads, self.block, self.part.offset, self.part.dilation_rate)

    def rows(self, x: Tensor, chunk: _Chunk) -> Tensor:
        """The chunk's query rows of a [B, Hq, N, ...] tensor (a view)."""
        return self._view(x, kv=False)[:, :, chunk.segments, chunk.queries]

    def kv_rows(self, x: Tensor, chunk: _Chunk) -> Tensor:
        """The chunk's key rows of a [B, Hkv, N, ...] tensor, one per query head."""
        rows = self._view(x, kv=True)[:, :, chunk.segments, chunk.keys]
        if isinstance(self.kv_heads, slice):
            return rows
        return rows.index_select(1, self.kv_heads.to(x.device))

    def add_kv(self, acc: Tensor, chunk: _Chunk, value: Tensor) -> None:
        """acc[kv heads, key rows] += value, summing query heads that share a kv head."""
        target = self._view(acc, kv=True)[:, :, chunk.segments, chunk.keys]
        if isinstance(self.kv_heads, slice):
            target.add_(value)
        else:
            target.index_add_(1, self.kv_heads.to(acc.device), value)

    def chunks(self, is_causal: bool) -> Iterator[_Chunk]:
        rows, segments = self.num_rows, self.block.num_segments
        per_query_row = max(1, self.batch_heads * rows)  # score elements per query row
        query_step = min(rows, max(1, _MAX_SCORE_ELEMENTS // per_query_row))
        segment_step = max(1, _MAX_SCORE_ELEMENTS // (per_query_row * rows))
        for first_segment in range(0, segments, segment_step):
            segment_slice = slice(first_segment, min(first_segment + segment_step, segments))
            for first_query in range(0, rows, query_step):
                last_query = min(first_query + query_step, rows)
                keys = slice(0, last_query if is_causal else rows)
                yield _Chunk(segment_slice, slice(first_query, last_query), keys)


def _tiles(q, k, segment_lengths, dilation_rates, mode) -> Iterator[_Tile]:
    batch, q_heads, seq_len, _ = q.shape
    for part in head_parts(segment_lengths, dilation_rates, mode, q_heads):
        for block in segment_blocks(part.segment_length, seq_len):
            if part.offset < block.segment_length:  # else this offset has no row here
                yield _Tile(part, block, batch, q_heads, k.shape[1])


def _scores(qc: Tensor, kc: Tensor, scale: float, is_causal: bool, first_query: int) -> Tensor:
    s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale)
    if is_causal:
        # Rows of one offset keep their order, so position order is dilated-index order:
        # query row first_query + i sees key rows j <= first_query + i.
        queries = torch.arange(first_query, first_query + s.shape[-2], device=s.device)
        future = torch.arange(s.shape[-1], device=s.device) > queries.unsqueeze(-1)
        s.masked_fill_(future, float("-inf"))
    return s


@torch.library.custom_op("dilated_compile::dilated_attention_pytorch", mutates_args=())
def dilated_attention_pytorch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
) -> tuple[Tensor, Tensor]:
    """``dilated_compile::dilated_attention`` implemented exactly in PyTorch (every device).
    Shapes: q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv] -> out [B, Hq, N, Dv]
    (q.dtype), lse [B, Hq, N] (float32; float64 for float64 inputs)."""
    check_op_args(q, k, v, segment_lengths, dilation_rates, mode)
    batch, q_heads, seq_len, head_dim = q.shape
    cdtype = lse_dtype(q.dtype)
    scale = resolve_scale(scale, head_dim)
    out = torch.zeros(batch, q_heads, seq_len, v.shape[-1], dtype=cdtype, device=q.device)
    lse = torch.full((batch, q_heads, seq_len), float("-inf"), dtype=cdtype, device=q.device)
    for tile in _tiles(q, k, segment_lengths, dilation_rates, mode):
        for chunk in tile.chunks(is_causal):
            s = _scores(
                tile.rows(q, chunk).to(cdtype), tile.kv_rows(k, chunk).to(cdtype), scale,
                is_causal, chunk.queries.start,
            )
            chunk_lse = torch.logsumexp(s, dim=-1)  # finite: every row attends at least itself
            probabilities = torch.exp(s - chunk_lse.unsqueeze(-1))
            chunk_out = torch.matmul(probabilities, tile.kv_rows(v, chunk).to(cdtype))
            # Merge with what earlier configs gave these rows (log-sum-exp, LongNet eq. 10).
            old_lse = tile.rows(lse, chunk)
            new_lse = torch.logaddexp(old_lse, chunk_lse)
            acc = tile.rows(out, chunk)
            acc.mul_(torch.exp(old_lse - new_lse).unsqueeze(-1))
            acc.add_(chunk_out * torch.exp(chunk_lse - new_lse).unsqueeze(-1))
            old_lse.copy_(new_lse)
    return out.to(q.dtype), lse


@torch.library.custom_op("dilated_compile::dilated_attention_backward_pytorch", mutates_args=())
def dilated_attention_backward_pytorch(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_lse: Optional[Tensor],
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """``dilated_compile::dilated_attention_backward`` in PyTorch: dq, dk, dv given dL/dout and
    dL/dlse (None when the lse is unused), the forward's inputs, ``out`` and ``lse``."""
    check_op_args(q, k, v, segment_lengths, dilation_rates, mode)
    cdtype = lse_dtype(q.dtype)
    scale = resolve_scale(scale, q.shape[-1])
    # dS = P * (dP - Delta + dL/dlse), since d lse / d s = P; fold dL/dlse into Delta.
    delta = (grad_out.to(cdtype) * out.to(cdtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(cdtype)
    dq = torch.zeros(q.shape, dtype=cdtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdtype, device=q.device)
    for tile in _tiles(q, k, segment_lengths, dilation_rates, mode):
        for chunk in tile.chunks(is_causal):
            qc = tile.rows(q, chunk).to(cdtype)
            doc = tile.rows(grad_out, chunk).to(cdtype)
            kc = tile.kv_rows(k, chunk).to(cdtype)
            vc = tile.kv_rows(v, chunk).to(cdtype)
            # This config's share of the merged probabilities (masked scores give exp(-inf) = 0).
            s = _scores(qc, kc, scale, is_causal, chunk.queries.start)
            p = torch.exp(s - tile.rows(lse, chunk).unsqueeze(-1))
            tile.add_kv(dv, chunk, torch.matmul(p.transpose(-1, -2), doc))
            dp = torch.matmul(doc, vc.transpose(-1, -2))
            ds = p.mul_(dp.sub_(tile.rows(delta, chunk).unsqueeze(-1))).mul_(scale)
            tile.rows(dq, chunk).add_(torch.matmul(ds, kc))
            tile.add_kv(dk, chunk, torch.matmul(ds.transpose(-1, -2), qc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- fake kernels ---------------------------------------------------------------------------


@dilated_attention_pytorch.register_fake
def _(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale):
    check_op_args(q, k, v, segment_lengths, dilation_rates, mode)
    batch, q_heads, seq_len, _ = q.shape
    out = q.new_empty(batch, q_heads, seq_len, v.shape[-1])
    lse = q.new_empty(batch, q_heads, seq_len, dtype=lse_dtype(q.dtype))
    return out, lse


@dilated_attention_backward_pytorch.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode, is_causal, scale):
    # Contiguous, like the real gradients (empty_like would copy the inputs' strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


dilated_attention_pytorch_op = torch.ops.dilated_compile.dilated_attention_pytorch.default
dilated_attention_backward_pytorch_op = torch.ops.dilated_compile.dilated_attention_backward_pytorch.default
