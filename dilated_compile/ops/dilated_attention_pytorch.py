"""The exact PyTorch implementation of dilated attention (every device), as the opaque ops
``dilated_compile::dilated_attention_pytorch`` and ``dilated_compile::dilated_attention_backward_pytorch``.

The public ops (``dilated_attention.py``) call these wherever the Triton kernels do not run: on
CPU, for float64, for head dims the kernels are not built for.

Semantics (docs/usage.md): with c[p, t] the number of configs under which query p
attends key t, keep[p, t] the bool mask and m[p, t] the float mask (all True / 0 without one),

    out_p = sum_t c[p,t] keep[p,t] exp(s_pt + m_pt) v_t / sum_t (the same weights)
    lse_p = log sum_t c[p,t] keep[p,t] exp(s_pt + m_pt)

which is LongNet's merge of per-config attention by softmax denominators. The implementation
below computes it that way: for each (config, offset) it attends over the dilated rows of each
segment (a strided view, cost O(N * w / r^2) per head slice, no N x N tensor), and merges the
result into a running output by log-sum-exp. The mask is read through the same views, at the
dilated rows and columns of each segment only (a stride-0 key-padding mask stays B * N
elements). The backward is FlashAttention-2 style: with the *final* lse and
Delta = rowsum(dO * O), each config's share of the gradient is independent, so the configs are
walked again and their dq/dk/dv summed.

Fewer queries than keys (Nq <= Nk): the pattern lives on the Nk key positions and query i is
position Nk - Nq + i, so only the segments that hold a query are visited (decoding one token
against a cache of any length costs one segment per config). A row left with no key (all its
pairs masked) gives out 0, lse -inf and zero gradients.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_op_args, expand_attn_mask
from ._numerics import lse_dtype, resolve_scale
from ._pattern import head_parts, kv_head_index, segment_blocks, segment_rows

# Scores of one chunk (several segments, or some query rows of one segment) stay below this many
# elements (64 MiB in float32), so memory stays linear in N whatever the segment length.
_MAX_SCORE_ELEMENTS = 1 << 24
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """Segments ``segments`` of a tile, its query rows ``queries`` (counted from the tile's first
    query row) of each, against key rows ``keys`` (the rows at or before the last query when
    causal, else all)."""

    segments: slice
    queries: slice
    keys: slice


class _Tile:
    """One (config, offset) head slice over one block of segments: views of the inputs, of the
    mask and of the per-row buffers at the dilated rows, cut into chunks whose scores stay below
    ``_MAX_SCORE_ELEMENTS`` (by segments, and by query rows when one segment is too large).

    Key rows are the rows ``offset, offset + r, ...`` of each segment; query rows are those of
    them at or after ``query_start`` (the position of query 0), the rows from
    ``first_query_row`` on (only a block of one segment can begin before ``query_start``)."""

    def __init__(self, part, block, batch: int, q_heads: int, kv_heads: int, query_start: int):
        self.part, self.block, self.query_start = part, block, query_start
        self.kv_heads = kv_head_index(part.heads, q_heads, kv_heads)
        self.batch_heads = batch * len(range(*part.heads.indices(q_heads)))
        rate = part.dilation_rate
        self.num_rows = len(range(part.offset, block.segment_length, rate))
        before = query_start - block.start - part.offset  # positions of this offset before it
        self.first_query_row = max(0, -(-before // rate))
        self.num_query_rows = self.num_rows - self.first_query_row

    def _key_view(self, x: Tensor, heads: slice) -> Tensor:
        part = self.part
        return segment_rows(x[:, heads], 2, self.block, 0, part.offset, part.dilation_rate)

    def _query_view(self, x: Tensor, dim: int = 2) -> Tensor:
        part = self.part
        first = part.offset + self.first_query_row * part.dilation_rate
        return segment_rows(x, dim, self.block, self.query_start, first, part.dilation_rate)

    def _kv_view(self, x: Tensor) -> Tensor:
        if isinstance(self.kv_heads, slice):
            return self._key_view(x, self.kv_heads)
        return self._key_view(x, slice(None))  # GQA: every kv head; kv_rows/add_kv pick them

    def rows(self, x: Tensor, chunk: _Chunk) -> Tensor:
        """The chunk's query rows of a [B, Hq, Nq, ...] tensor (a view)."""
        return self._query_view(x[:, self.part.heads])[:, :, chunk.segments, chunk.queries]

    def kv_rows(self, x: Tensor, chunk: _Chunk) -> Tensor:
        """The chunk's key rows of a [B, Hkv, Nk, ...] tensor, one per query head."""
        rows = self._kv_view(x)[:, :, chunk.segments, chunk.keys]
        if isinstance(self.kv_heads, slice):
            return rows
        return rows.index_select(1, self.kv_heads.to(x.device))

    def add_kv(self, acc: Tensor, chunk: _Chunk, value: Tensor) -> None:
        """acc[kv heads, key rows] += value, summing query heads that share a kv head."""
        target = self._kv_view(acc)[:, :, chunk.segments, chunk.keys]
        if isinstance(self.kv_heads, slice):
            target.add_(value)
        else:
            target.index_add_(1, self.kv_heads.to(acc.device), value)

    def mask_rows(self, mask: Tensor, chunk: _Chunk) -> Tensor:
        """The chunk's entries of a [B, Hq, Nq, Nk] mask: [B, h, segments, queries, keys], a
        view (stride 0 where the mask broadcasts). Query and key rows are taken along their own
        dims; a query attends keys of its own segment only, the diagonal of the two segment
        axes."""
        part = self.part
        rows = self._query_view(mask[:, part.heads])  # [B, h, S, query rows, Nk]
        rows = segment_rows(rows, 4, self.block, 0, part.offset, part.dilation_rate)
        rows = rows.diagonal(dim1=2, dim2=4).movedim(-1, 2)  # [B, h, S, query rows, key rows]
        return rows[:, :, chunk.segments, chunk.queries, chunk.keys]

    def chunks(self, is_causal: bool) -> Iterator[_Chunk]:
        rows, queries, segments = self.num_rows, self.num_query_rows, self.block.num_segments
        per_query_row = max(1, self.batch_heads * rows)  # score elements per query row
        query_step = min(queries, max(1, _MAX_SCORE_ELEMENTS // per_query_row))
        segment_step = max(1, _MAX_SCORE_ELEMENTS // (per_query_row * queries))
        for first_segment in range(0, segments, segment_step):
            segment_slice = slice(first_segment, min(first_segment + segment_step, segments))
            for first_query in range(0, queries, query_step):
                last_query = min(first_query + query_step, queries)
                keys = slice(0, self.first_query_row + last_query if is_causal else rows)
                yield _Chunk(segment_slice, slice(first_query, last_query), keys)


def _tiles(q, k, segment_lengths, dilation_rates, mode) -> Iterator[_Tile]:
    batch, q_heads, q_len, _ = q.shape
    seq_len = k.shape[2]
    query_start = seq_len - q_len  # queries are the last positions (KV-cache convention)
    for part in head_parts(segment_lengths, dilation_rates, mode, q_heads):
        for block in segment_blocks(part.segment_length, seq_len, query_start):
            tile = _Tile(part, block, batch, q_heads, k.shape[1], query_start)
            if tile.num_query_rows > 0:  # else this offset has no query row here
                yield tile


def _scores(tile: _Tile, chunk: _Chunk, qc: Tensor, kc: Tensor, scale: float, is_causal: bool,
            mask: Optional[Tensor]) -> Tensor:
    s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale)
    if is_causal:
        # Rows of one offset keep their order, so position order is dilated-index order:
        # query row j (counted over the whole segment) sees key rows <= j.
        first = tile.first_query_row + chunk.queries.start
        queries = torch.arange(first, first + s.shape[-2], device=s.device)
        future = torch.arange(s.shape[-1], device=s.device) > queries.unsqueeze(-1)
        s.masked_fill_(future, _NEG_INF)
    if mask is not None:
        picked = tile.mask_rows(mask, chunk)
        if picked.dtype == torch.bool:
            s.masked_fill_(picked.logical_not(), _NEG_INF)
        else:
            s.add_(picked)
    return s


def _finite_or_zero(x: Tensor) -> Tensor:
    """-inf (a row with no key so far) -> 0, so that x - lse and lse - x never give NaN."""
    return torch.where(torch.isneginf(x), 0.0, x)


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
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``dilated_compile::dilated_attention`` implemented exactly in PyTorch (every device).
    Shapes: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (Nq <= Nk), attn_mask
    broadcastable to [B, Hq, Nq, Nk] or None -> out [B, Hq, Nq, Dv] (q.dtype), lse [B, Hq, Nq]
    (float32; float64 for float64 inputs; -inf on rows with no key)."""
    check_op_args(q, k, v, segment_lengths, dilation_rates, mode, attn_mask)
    mask = expand_attn_mask(attn_mask, q, k)
    batch, q_heads, q_len, head_dim = q.shape
    cdtype = lse_dtype(q.dtype)
    scale = resolve_scale(scale, head_dim)
    out = torch.zeros(batch, q_heads, q_len, v.shape[-1], dtype=cdtype, device=q.device)
    lse = torch.full((batch, q_heads, q_len), _NEG_INF, dtype=cdtype, device=q.device)
    for tile in _tiles(q, k, segment_lengths, dilation_rates, mode):
        for chunk in tile.chunks(is_causal):
            s = _scores(
                tile, chunk, tile.rows(q, chunk).to(cdtype), tile.kv_rows(k, chunk).to(cdtype),
                scale, is_causal, mask,
            )
            # -inf on rows whose every pair here is masked (without a mask a row always
            # attends at least itself).
            chunk_lse = torch.logsumexp(s, dim=-1)
            probabilities = torch.exp(s - _finite_or_zero(chunk_lse).unsqueeze(-1))
            chunk_out = torch.matmul(probabilities, tile.kv_rows(v, chunk).to(cdtype))
            # Merge with what earlier configs gave these rows (log-sum-exp, LongNet eq. 10).
            old_lse = tile.rows(lse, chunk)
            new_lse = torch.logaddexp(old_lse, chunk_lse)
            safe_lse = _finite_or_zero(new_lse)
            acc = tile.rows(out, chunk)
            acc.mul_(torch.exp(old_lse - safe_lse).unsqueeze(-1))
            acc.add_(chunk_out * torch.exp(chunk_lse - safe_lse).unsqueeze(-1))
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
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``dilated_compile::dilated_attention_backward`` in PyTorch: dq, dk, dv given dL/dout and
    dL/dlse (None when the lse is unused), the forward's inputs (the mask included), ``out`` and
    ``lse``. Rows with no key get zero gradient."""
    check_op_args(q, k, v, segment_lengths, dilation_rates, mode, attn_mask)
    mask = expand_attn_mask(attn_mask, q, k)
    cdtype = lse_dtype(q.dtype)
    scale = resolve_scale(scale, q.shape[-1])
    # dS = P * (dP - Delta + dL/dlse), since d lse / d s = P; fold dL/dlse into Delta.
    delta = (grad_out.to(cdtype) * out.to(cdtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(cdtype)
    # A row with lse -inf has every score -inf: with lse read as 0 its P is exactly 0.
    lse = _finite_or_zero(lse.to(cdtype))
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
            s = _scores(tile, chunk, qc, kc, scale, is_causal, mask)
            p = torch.exp(s - tile.rows(lse, chunk).unsqueeze(-1))
            tile.add_kv(dv, chunk, torch.matmul(p.transpose(-1, -2), doc))
            dp = torch.matmul(doc, vc.transpose(-1, -2))
            ds = p.mul_(dp.sub_(tile.rows(delta, chunk).unsqueeze(-1))).mul_(scale)
            tile.rows(dq, chunk).add_(torch.matmul(ds, kc))
            tile.add_kv(dk, chunk, torch.matmul(ds.transpose(-1, -2), qc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- fake kernels ---------------------------------------------------------------------------


@dilated_attention_pytorch.register_fake
def _(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, attn_mask=None):
    check_op_args(q, k, v, segment_lengths, dilation_rates, mode, attn_mask)
    batch, q_heads, q_len, _ = q.shape
    out = q.new_empty(batch, q_heads, q_len, v.shape[-1])
    lse = q.new_empty(batch, q_heads, q_len, dtype=lse_dtype(q.dtype))
    return out, lse


@dilated_attention_backward_pytorch.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode, is_causal, scale,
      attn_mask=None):
    # Contiguous, like the real gradients (empty_like would copy the inputs' strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


dilated_attention_pytorch_op = torch.ops.dilated_compile.dilated_attention_pytorch.default
dilated_attention_backward_pytorch_op = torch.ops.dilated_compile.dilated_attention_backward_pytorch.default
