"""Block-sparse attention in plain PyTorch: the exact implementation of the ops off the kernels
(CPU, float64, other head dims and block sizes), and the aten decomposition export uses.

Semantics (``BlockSparseSpec``, docs/block_sparse.md): query position ``p`` attends key ``t``
when the block index keeps ``(p // bs, t // bs)`` (``ops._block_layout``), ``t <= p`` if causal,
and the mask keeps the pair; plain softmax over those keys (a float mask added to the scores);
a row with no key gives out 0, lse -inf and zero gradients.

The core works on chunks of query blocks with functional ops of static shapes only: for each
query block it gathers the kept key blocks (``W * bs`` keys), so the scores of a block never
exceed ``bs x W * bs``, never ``N x N``. The PyTorch op runs it over chunks (memory linear in N);
its backward recomputes each chunk's scores and applies FlashAttention-2's formulas with the
final lse; the decomposition runs it once over every query block.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ._block_layout import BlockIndex, build_block_index
from ._checks import expand_attn_mask
from ._numerics import lse_dtype, resolve_scale

# Scores of one chunk of query blocks stay below this many elements (64 MiB in float32).
_MAX_SCORE_ELEMENTS = 1 << 24
_NEG_INF = float("-inf")


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for operands with the same leading dims, as one ``bmm`` of contiguous operands:
    ``matmul``'s own reshapes would make the decomposition guard on the (symbolic) number of
    blocks being 1, a guard an exported program then checks against every length."""
    lead = a.shape[:-2]
    out = torch.bmm(a.contiguous().flatten(0, -3), b.contiguous().flatten(0, -3))
    return out.unflatten(0, lead)


def _blocks(x: Tensor, num_blocks: int, block_size: int, start: int = 0) -> Tensor:
    """``[B, H, L, E]`` rows at positions ``start ..`` as ``[B, H, num_blocks, bs, E]`` blocks of
    positions ``0 .. num_blocks * bs - 1`` (zero rows where ``x`` has none)."""
    before = start
    after = num_blocks * block_size - start - x.shape[2]
    x = torch.nn.functional.pad(x, (0, 0, before, after))
    return x.unflatten(2, (num_blocks, block_size))


@dataclasses.dataclass
class _Chunk:
    """One chunk of query blocks with its kept key blocks gathered: what the forward and the
    backward of those blocks share."""

    k_rows: Tensor  # [B, Hq, R, W*bs, D]: each query block's kept keys, per query head
    v_rows: Tensor  # [B, Hq, R, W*bs, Dv]
    flat: Tensor  # [Hq * R * W] int64: the (kv head, key block) each gathered block came from
    scores: Tensor  # [B, Hq, R, bs, W*bs], scaled, float mask added, -inf where removed


def gather_chunk(
    q_blocks: Tensor,
    k_blocks: Tensor,
    v_blocks: Tensor,
    key_blocks: Tensor,
    key_count: Tensor,
    rows: Tensor,
    *,
    block_size: int,
    seq_q: int,
    seq_k: int,
    scale: float,
    is_causal: bool,
    attn_mask: Optional[Tensor],
) -> _Chunk:
    """Gather the kept key blocks of some query blocks and score them.

    Args:
        q_blocks: ``[B, Hq, R, bs, D]`` the query blocks (positions ``rows[r] * bs + u``; rows
            before the first query or past the sequence are zeros, their results unused).
        k_blocks, v_blocks: ``[B, Hkv, Mk, bs, D(v)]`` every key block (zero rows past ``seq_k``).
        key_blocks: ``[H', R, W]`` int64, each query block's kept key blocks (``slot <
            key_count`` valid, other slots any value); ``H'`` is 1 or ``Hq``.
        key_count: ``[H', R]`` int64.
        rows: ``[R]`` int64 position blocks of the query blocks.
        block_size, seq_q, seq_k, scale, is_causal: the call's.
        attn_mask: None or a ``[B, Hq, Nq, Nk]`` view (bool or float).
    """
    batch, q_heads, num_rows, bs, _ = q_blocks.shape
    kv_heads, width = k_blocks.shape[1], key_blocks.shape[-1]
    device = q_blocks.device
    slots = torch.arange(width, device=device)
    kept_slot = slots.view(1, 1, -1) < key_count.unsqueeze(-1)  # [H', R, W]
    blocks = torch.where(kept_slot, key_blocks, 0).expand(q_heads, num_rows, width)
    # Each query head's kept key blocks from its kv head: [B, Hq, R, W*bs, D].
    kv_head = torch.arange(q_heads, device=device) // (q_heads // kv_heads)
    flat = (kv_head.view(-1, 1, 1) * k_blocks.shape[2] + blocks).reshape(-1)
    # Advanced indexing then a flatten of the fresh result: no view of a symbolic reshape, so
    # the decomposition traces without guards on the number of blocks.
    gathered = lambda x: x[:, kv_head.view(-1, 1, 1), blocks].flatten(3, 4)  # noqa: E731
    k_rows, v_rows = gathered(k_blocks), gathered(v_blocks)
    scores = _matmul(q_blocks, k_rows.transpose(-1, -2)) * scale  # [B, Hq, R, bs, W*bs]

    # Which pairs attend: a kept slot, key and query inside the sequence, causal, the mask.
    offset = torch.arange(bs, device=device)
    key_pos = (blocks.unsqueeze(-1) * bs + offset).flatten(-2)  # [Hq, R, W*bs]
    query_pos = rows.view(-1, 1) * bs + offset  # [R, bs]
    first_query = seq_k - seq_q
    keep = (kept_slot.expand(q_heads, num_rows, width).unsqueeze(-1).expand(-1, -1, -1, bs)
            .flatten(-2).unsqueeze(-2))  # [Hq, R, 1, W*bs]
    keep = keep & (key_pos < seq_k).unsqueeze(-2)
    keep = keep & ((query_pos >= first_query) & (query_pos < seq_k)).unsqueeze(-1)
    if is_causal:
        keep = keep & (key_pos.unsqueeze(-2) <= query_pos.unsqueeze(-1))
    keep = keep.unsqueeze(0)  # [1, Hq, R, bs, W*bs]
    if attn_mask is not None:
        picked = _mask_entries(attn_mask, query_pos - first_query, key_pos, seq_q, seq_k)
        if picked.dtype == torch.bool:
            keep = keep & picked
        else:
            scores = scores + picked.to(scores.dtype)
            keep = keep & (picked > _NEG_INF)
    # torch.where (not addition of -inf) keeps removed pairs out of autograd's gradient too.
    return _Chunk(k_rows, v_rows, flat, torch.where(keep, scores, _NEG_INF))


def forward_chunk(chunk: _Chunk) -> tuple[Tensor, Tensor]:
    """``out`` ``[B, Hq, R, bs, Dv]`` and ``lse`` ``[B, Hq, R, bs]`` (-inf: no key)."""
    lse = torch.logsumexp(chunk.scores, dim=-1)
    finite = torch.where(torch.isneginf(lse), 0.0, lse)
    weights = torch.exp(chunk.scores - finite.unsqueeze(-1))  # 0 on removed pairs
    return _matmul(weights, chunk.v_rows), lse


def backward_chunk(chunk: _Chunk, q_blocks: Tensor, lse: Tensor, delta: Tensor,
                    grad_out: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2's backward of one chunk with the final lse and
    ``delta = rowsum(dO * O) - dL/dlse``: dq ``[B, Hq, R, bs, D]`` and the gathered blocks' dk,
    dv ``[B, Hq*R*W, bs, D(v)]`` (to be added at ``chunk.flat``)."""
    finite = torch.where(torch.isneginf(lse), 0.0, lse)
    p = torch.exp(chunk.scores - finite.unsqueeze(-1))
    dv_rows = _matmul(p.transpose(-1, -2), grad_out)
    ds = p * (_matmul(grad_out, chunk.v_rows.transpose(-1, -2)) - delta.unsqueeze(-1))
    dq = _matmul(ds, chunk.k_rows) * scale
    dk_rows = _matmul(ds.transpose(-1, -2), q_blocks) * scale
    block = q_blocks.shape[3]
    to_blocks = lambda x: x.flatten(1, 2).unflatten(2, (-1, block)).flatten(1, 2)  # noqa: E731
    return dq, to_blocks(dk_rows), to_blocks(dv_rows)


def _stored(mask: Tensor) -> Tensor:
    """A broadcast view cut to the entries it stores (size 1 where its stride is 0)."""
    return mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]


def _mask_entries(attn_mask: Tensor, query_index: Tensor, key_pos: Tensor, seq_q: int,
                  seq_k: int) -> Tensor:
    """The mask's entries at (query ``query_index`` ``[R, bs]``, key position ``key_pos``
    ``[Hq, R, W*bs]``): ``[B or 1, Hq, R, bs or 1, W*bs]``. Read from the stored entries only, so
    a key-padding mask ``[B, 1, 1, Nk]`` costs ``W*bs`` entries a block, not ``bs x Nk``; indices
    outside the sequence read entry 0 (those pairs are removed anyway)."""
    stored = _stored(attn_mask)  # [b, h, q, Nk]
    batch, q_heads = stored.shape[0], key_pos.shape[0]
    num_rows, width = key_pos.shape[1], key_pos.shape[2]
    if stored.shape[2] > 1:
        stored = stored[:, :, query_index.clamp(0, seq_q - 1)]  # [b, h, R, bs, Nk]
    else:
        stored = stored.unsqueeze(2)  # [b, h, 1, 1, Nk]
    per_row = stored.shape[3]
    stored = stored.expand(batch, q_heads, num_rows, per_row, stored.shape[-1])
    keys = key_pos.clamp(0, seq_k - 1).view(1, q_heads, num_rows, 1, width)
    return stored.gather(-1, keys.expand(batch, q_heads, num_rows, per_row, width))


def prepare_blocks(q, k, v, index: BlockIndex, block_size: int):
    """The inputs as blocks in the computation dtype: queries ``[B, Hq, Mq, bs, D]`` of the
    index's rows, keys and values ``[B, Hkv, Mk, bs, D]``."""
    cdtype = lse_dtype(q.dtype)
    seq_k = k.shape[2]
    q_blocks = query_blocks(q.to(cdtype), index, block_size, seq_k)
    k_blocks = _blocks(k.to(cdtype), index.num_key_blocks, block_size)
    v_blocks = _blocks(v.to(cdtype), index.num_key_blocks, block_size)
    return q_blocks, k_blocks, v_blocks


def query_blocks(x: Tensor, index: BlockIndex, block_size: int, seq_k: int) -> Tensor:
    """A per-query tensor ``[B, H, Nq, E]`` as the index rows' blocks ``[B, H, Mq, bs, E]``."""
    start = (seq_k - x.shape[2]) - index.first_block * block_size
    return _blocks(x, index.num_query_blocks, block_size, start=start)


def _row_chunks(index: BlockIndex, batch: int, q_heads: int, block_size: int):
    """Slices of index rows whose scores stay under ``_MAX_SCORE_ELEMENTS``; global rows (which
    walk every key block) apart from the others."""
    def chunks(lo, hi, width):
        per_row = max(1, batch * q_heads * block_size * width * block_size)
        step = max(1, _MAX_SCORE_ELEMENTS // per_row)
        return [slice(r, min(r + step, hi)) for r in range(lo, hi, step)]

    return (chunks(0, index.dense_rows, index.num_key_blocks)
            + chunks(index.dense_rows, index.num_query_blocks, index.kv_indices.shape[-1]))


def _row_index(index: BlockIndex, rows: slice):
    """``(key_blocks [H', R, W], key_count [H', R])`` int64 for index rows ``rows``; global rows
    list every key block (``j = slot``)."""
    if rows.start < index.dense_rows:
        width = index.num_key_blocks
        heads = index.kv_counts.shape[0]
        key_blocks = torch.arange(width, device=index.kv_counts.device).expand(
            heads, rows.stop - rows.start, width)
    else:
        key_blocks = index.kv_indices[:, rows].long()
    return key_blocks, index.kv_counts[:, rows].long()


def _index(q, k, block_size, local_blocks, global_blocks, random_blocks, seed, layout, is_causal,
           transpose=False):
    return build_block_index(
        block_size, local_blocks, global_blocks, random_blocks, seed, layout, q.shape[1],
        q.shape[2], k.shape[2], is_causal, q.device, transpose=transpose,
    )


def _gather_rows(index, rows, q_blocks, k_blocks, v_blocks, *, block_size, seq_q, seq_k, scale,
                 is_causal, mask) -> _Chunk:
    key_blocks, key_count = _row_index(index, rows)
    positions = torch.arange(rows.start, rows.stop, device=q_blocks.device) + index.first_block
    return gather_chunk(
        q_blocks[:, :, rows], k_blocks, v_blocks, key_blocks, key_count, positions,
        block_size=block_size, seq_q=seq_q, seq_k=seq_k, scale=scale, is_causal=is_causal,
        attn_mask=mask,
    )


def to_queries(blocks: Tensor, index: BlockIndex, block_size: int, seq_q: int, seq_k: int) -> Tensor:
    """``[B, H, Mq, bs, ...]`` results of the index rows back to the ``[B, H, Nq, ...]`` queries."""
    flat = blocks.flatten(2, 3)
    start = (seq_k - seq_q) - index.first_block * block_size
    return flat[:, :, start : start + seq_q]


def _setup(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout,
           is_causal, scale, attn_mask):
    """The index, the blocks and the call's constants shared by the forward and the backward."""
    index = build_block_index(
        block_size, local_blocks, global_blocks, random_blocks, seed, layout, q.shape[1],
        q.shape[2], k.shape[2], is_causal, q.device,
    )
    q_blocks, k_blocks, v_blocks = prepare_blocks(q, k, v, index, block_size)
    constants = dict(block_size=block_size, seq_q=q.shape[2], seq_k=k.shape[2],
                     scale=resolve_scale(scale, q.shape[-1]), is_causal=is_causal,
                     mask=expand_attn_mask(attn_mask, q, k))
    return index, q_blocks, k_blocks, v_blocks, constants


@torch.library.custom_op("dilated_compile::block_sparse_attention_pytorch", mutates_args=())
def block_sparse_attention_pytorch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    local_blocks: Optional[int],
    global_blocks: int,
    random_blocks: int,
    seed: int,
    layout: Optional[Tensor],
    is_causal: bool,
    scale: Optional[float],
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``dilated_compile::block_sparse_attention`` in PyTorch (every device). Shapes: q
    ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` (``Nq <= Nk``), attn_mask
    broadcastable to ``[B, Hq, Nq, Nk]`` or None -> out ``[B, Hq, Nq, Dv]`` (q.dtype), lse
    ``[B, Hq, Nq]`` (float32; float64 for float64 inputs; -inf on rows with no key)."""
    batch, q_heads, seq_q, _ = q.shape
    cdtype = lse_dtype(q.dtype)
    if seq_q == 0:
        return (q.new_zeros(batch, q_heads, 0, v.shape[-1]),
                q.new_zeros(batch, q_heads, 0, dtype=cdtype))
    index, q_blocks, k_blocks, v_blocks, constants = _setup(
        q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout, is_causal,
        scale, attn_mask)
    out_blocks = q_blocks.new_zeros(q_blocks.shape[:-1] + (v.shape[-1],))
    lse_blocks = torch.full(q_blocks.shape[:-1], _NEG_INF, dtype=cdtype, device=q.device)
    for rows in _row_chunks(index, batch, q_heads, block_size):
        chunk = _gather_rows(index, rows, q_blocks, k_blocks, v_blocks, **constants)
        out_blocks[:, :, rows], lse_blocks[:, :, rows] = forward_chunk(chunk)
    out = to_queries(out_blocks, index, block_size, seq_q, k.shape[2]).to(q.dtype)
    return out.contiguous(), to_queries(lse_blocks, index, block_size, seq_q, k.shape[2]).contiguous()


@torch.library.custom_op("dilated_compile::block_sparse_attention_backward_pytorch", mutates_args=())
def block_sparse_attention_backward_pytorch(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_lse: Optional[Tensor],
    block_size: int,
    local_blocks: Optional[int],
    global_blocks: int,
    random_blocks: int,
    seed: int,
    layout: Optional[Tensor],
    is_causal: bool,
    scale: Optional[float],
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of ``block_sparse_attention_pytorch`` given dL/dout, dL/dlse (None when the
    lse is unused), the forward's inputs and its out and lse. dk/dv of the gathered key blocks
    are added back with ``index_add_`` (in a fixed order on the CPU)."""
    batch, q_heads, seq_q, _ = q.shape
    if seq_q == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cdtype = lse_dtype(q.dtype)
    index, q_blocks, k_blocks, v_blocks, constants = _setup(
        q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout, is_causal,
        scale, attn_mask)
    seq_k = k.shape[2]
    # Delta = rowsum(dO * O) - dL/dlse, per query row.
    delta = (grad_out.to(cdtype) * out.to(cdtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.where(torch.isfinite(lse), grad_lse.to(cdtype), 0.0)
    per_query = [query_blocks(x, index, block_size, seq_k) for x in
                 (grad_out.to(cdtype), lse.to(cdtype).unsqueeze(-1), delta.unsqueeze(-1))]
    grad_out_blocks, lse_blocks, delta_blocks = per_query[0], per_query[1][..., 0], per_query[2][..., 0]
    dq_blocks = torch.zeros_like(q_blocks)
    dk_blocks = torch.zeros_like(k_blocks).flatten(1, 2)  # [B, Hkv*Mk, bs, D]
    dv_blocks = torch.zeros_like(v_blocks).flatten(1, 2)
    for rows in _row_chunks(index, batch, q_heads, block_size):
        chunk = _gather_rows(index, rows, q_blocks, k_blocks, v_blocks, **constants)
        dq, dk, dv = backward_chunk(
            chunk, q_blocks[:, :, rows], lse_blocks[:, :, rows], delta_blocks[:, :, rows],
            grad_out_blocks[:, :, rows], constants["scale"])
        dq_blocks[:, :, rows] = dq
        dk_blocks.index_add_(1, chunk.flat, dk)
        dv_blocks.index_add_(1, chunk.flat, dv)
    dq = to_queries(dq_blocks, index, block_size, seq_q, seq_k)
    dk = dk_blocks.unflatten(1, k_blocks.shape[1:3]).flatten(2, 3)[:, :, :seq_k]
    dv = dv_blocks.unflatten(1, v_blocks.shape[1:3]).flatten(2, 3)[:, :, :seq_k]
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@block_sparse_attention_pytorch.register_fake
def _(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout, is_causal,
      scale, attn_mask=None):
    batch, q_heads, seq_q, _ = q.shape
    out = q.new_empty(batch, q_heads, seq_q, v.shape[-1])
    return out, q.new_empty(batch, q_heads, seq_q, dtype=lse_dtype(q.dtype))


@block_sparse_attention_backward_pytorch.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, block_size, local_blocks, global_blocks,
      random_blocks, seed, layout, is_causal, scale, attn_mask=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


block_sparse_attention_pytorch_op = torch.ops.dilated_compile.block_sparse_attention_pytorch.default
block_sparse_attention_backward_pytorch_op = (
    torch.ops.dilated_compile.block_sparse_attention_backward_pytorch.default
)
