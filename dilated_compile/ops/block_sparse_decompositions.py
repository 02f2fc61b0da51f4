"""Decompositions of the block-sparse ops into standard aten ops (export, ONNX, AOTInductor
packages that load without this library, Torch-TensorRT); part of
``decompositions.dilated_attention_decompositions()``.

They run the PyTorch implementation's core (``block_sparse_attention_pytorch``) once over every
query block instead of in chunks: the block index is built from the (possibly symbolic) lengths,
each query block gathers its kept key blocks, global rows gather every key block. Memory is
``O(N * W * bs)`` per head (``W`` the blocks a row keeps), never ``N x N`` (global rows aside,
which hold ``global_blocks * bs`` rows of all ``N`` keys).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._block_layout import BlockIndex, build_block_index
from ._checks import expand_attn_mask
from ._numerics import lse_dtype, resolve_scale
from .decompositions import size_oblivious
from .block_sparse_attention import (
    block_sparse_attention_backward_op,
    block_sparse_attention_op,
    check_block_sparse_args,
)
from .block_sparse_attention_pytorch import (
    backward_chunk,
    forward_chunk,
    gather_chunk,
    prepare_blocks,
    query_blocks,
    to_queries,
)


def _index(q, k, block_size, local_blocks, global_blocks, random_blocks, seed, layout, is_causal):
    return build_block_index(
        block_size, local_blocks, global_blocks, random_blocks, seed, layout, q.shape[1],
        q.shape[2], k.shape[2], is_causal, q.device,
    )


def _pad_rows(x: Tensor, rows) -> Tensor:
    """``x`` ``[B, H, R, ...]`` with ``rows`` more zero rows along dim 2."""
    padding = [0, 0] * (x.dim() - 3) + [0, rows]
    return torch.nn.functional.pad(x, padding)


def _chunks(index: BlockIndex, q_blocks, k_blocks, v_blocks, global_blocks, *, block_size, seq_q,
            seq_k, scale, is_causal, mask):
    """Two gathered chunks whose shapes need no case analysis on the (symbolic) lengths:

    - every index row over its listed key blocks, global rows with none;
    - ``global_blocks`` rows (a static count; the first index rows, padded with empty ones)
      over every key block, the rows that are not global with none.

    Each row keeps keys in one of the two, so merging their softmaxes by log-sum-exp gives the
    row (``merge_chunks``). Slicing the global rows out by their symbolic count instead would
    make the decomposition guard on it."""
    device = q_blocks.device
    rows = index.num_query_blocks
    row = torch.arange(rows, device=device)
    global_row = (row < index.dense_rows).view(1, -1)
    positions = row + index.first_block
    regular = gather_chunk(
        q_blocks, k_blocks, v_blocks, index.kv_indices.long(),
        torch.where(global_row, 0, index.kv_counts.long()), positions, block_size=block_size,
        seq_q=seq_q, seq_k=seq_k, scale=scale, is_causal=is_causal, attn_mask=mask,
    )
    if not global_blocks:
        return [regular]
    heads = index.kv_counts.shape[0]
    first = torch.arange(global_blocks, device=device)
    counts = _pad_rows(torch.where(global_row, index.kv_counts.long(), 0).unsqueeze(0), global_blocks)
    all_blocks = torch.arange(index.num_key_blocks, device=device).expand(
        heads, global_blocks, index.num_key_blocks)
    dense = gather_chunk(
        _pad_rows(q_blocks, global_blocks)[:, :, :global_blocks], k_blocks, v_blocks, all_blocks,
        counts[0, :, :global_blocks], first + index.first_block, block_size=block_size,
        seq_q=seq_q, seq_k=seq_k, scale=scale, is_causal=is_causal, attn_mask=mask,
    )
    return [regular, dense]


def merge_chunks(results: list[tuple[Tensor, Tensor]], rows) -> tuple[Tensor, Tensor]:
    """The (out, lse) of all ``rows`` index rows from the chunks' results: the first chunk's
    cover every row, a later (global) chunk's its first rows; merged by log-sum-exp (a row is
    empty, lse -inf, in all chunks but one)."""
    out, lse = results[0]
    for part_out, part_lse in results[1:]:
        # To ``rows`` rows by padding, then cutting: never a slice by a symbolic count.
        part_out = _pad_rows(part_out, rows)[:, :, :rows]
        part_lse = torch.nn.functional.pad(part_lse, (0, 0, 0, rows), value=float("-inf"))[:, :, :rows]
        top = torch.maximum(lse, part_lse)
        top = torch.where(torch.isneginf(top), 0.0, top)
        weight, part_weight = torch.exp(lse - top), torch.exp(part_lse - top)
        total = weight + part_weight
        safe = torch.where(total > 0, total, 1.0)
        out = (out * weight.unsqueeze(-1) + part_out * part_weight.unsqueeze(-1)) / safe.unsqueeze(-1)
        lse = torch.where(total > 0, torch.log(safe) + top, float("-inf"))
    return out, lse


def block_sparse_attention_decomposition(
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
    """``torch.ops.dilated_compile.block_sparse_attention`` in aten ops (same arguments and
    results: ``out [B, Hq, Nq, Dv]`` in q.dtype, ``lse [B, Hq, Nq]`` float32 or float64).

    Example::

        >>> q = k = v = torch.randn(1, 4, 100, 16)
        >>> out, lse = block_sparse_attention_decomposition(q, k, v, 16, 1, 1, 0, 0, None, True, None)
    """
    with size_oblivious():
        return _forward(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout,
                        is_causal, scale, attn_mask)


def _forward(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout,
             is_causal, scale, attn_mask):
    check_block_sparse_args(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed,
                            layout, attn_mask)
    seq_q, seq_k = q.shape[2], k.shape[2]
    index = _index(q, k, block_size, local_blocks, global_blocks, random_blocks, seed, layout,
                   is_causal)
    q_blocks, k_blocks, v_blocks = prepare_blocks(q, k, v, index, block_size)
    chunks = _chunks(index, q_blocks, k_blocks, v_blocks, global_blocks, block_size=block_size,
                     seq_q=seq_q, seq_k=seq_k, scale=resolve_scale(scale, q.shape[-1]),
                     is_causal=is_causal, mask=expand_attn_mask(attn_mask, q, k))
    out, lse = merge_chunks([forward_chunk(chunk) for chunk in chunks], index.num_query_blocks)
    out = to_queries(out, index, block_size, seq_q, seq_k).to(q.dtype)
    return out, to_queries(lse, index, block_size, seq_q, seq_k).to(lse_dtype(q.dtype))


def block_sparse_attention_backward_decomposition(
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
    """``torch.ops.dilated_compile.block_sparse_attention_backward`` in aten ops: dq, dk, dv
    (FlashAttention-2's formulas with the final lse), in the inputs' dtypes."""
    with size_oblivious():
        return _backward(grad_out, q, k, v, out, lse, grad_lse, block_size, local_blocks,
                         global_blocks, random_blocks, seed, layout, is_causal, scale, attn_mask)


def _backward(grad_out, q, k, v, out, lse, grad_lse, block_size, local_blocks, global_blocks,
              random_blocks, seed, layout, is_causal, scale, attn_mask):
    check_block_sparse_args(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed,
                            layout, attn_mask)
    seq_q, seq_k = q.shape[2], k.shape[2]
    cdtype = lse_dtype(q.dtype)
    index = _index(q, k, block_size, local_blocks, global_blocks, random_blocks, seed, layout,
                   is_causal)
    q_blocks, k_blocks, v_blocks = prepare_blocks(q, k, v, index, block_size)
    scale = resolve_scale(scale, q.shape[-1])
    chunks = _chunks(index, q_blocks, k_blocks, v_blocks, global_blocks, block_size=block_size,
                     seq_q=seq_q, seq_k=seq_k, scale=scale, is_causal=is_causal,
                     mask=expand_attn_mask(attn_mask, q, k))
    delta = (grad_out.to(cdtype) * out.to(cdtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.where(torch.isfinite(lse), grad_lse.to(cdtype), 0.0)
    grad_out_blocks = query_blocks(grad_out.to(cdtype), index, block_size, seq_k)
    lse_blocks = query_blocks(lse.to(cdtype).unsqueeze(-1), index, block_size, seq_k)[..., 0]
    delta_blocks = query_blocks(delta.unsqueeze(-1), index, block_size, seq_k)[..., 0]
    rows = index.num_query_blocks
    dq_blocks = torch.zeros_like(q_blocks)
    dk_blocks = torch.zeros_like(k_blocks).flatten(1, 2)
    dv_blocks = torch.zeros_like(v_blocks).flatten(1, 2)
    for chunk in chunks:
        # A chunk of fewer rows (the global one) stands for the first rows: pad, then cut.
        size = chunk.scores.shape[2]
        per_row = [_pad_rows(x, size)[:, :, :size] for x in (q_blocks, lse_blocks.unsqueeze(-1),
                                                              delta_blocks.unsqueeze(-1), grad_out_blocks)]
        dq, dk, dv = backward_chunk(chunk, per_row[0], per_row[1][..., 0], per_row[2][..., 0],
                                    per_row[3], scale)
        dq_blocks = dq_blocks + _pad_rows(dq, rows)[:, :, :rows]
        dk_blocks = dk_blocks.index_add(1, chunk.flat, dk)
        dv_blocks = dv_blocks.index_add(1, chunk.flat, dv)
    dq = to_queries(dq_blocks, index, block_size, seq_q, seq_k)
    dk = dk_blocks.unflatten(1, k_blocks.shape[1:3]).flatten(2, 3)[:, :, :seq_k]
    dv = dv_blocks.unflatten(1, v_blocks.shape[1:3]).flatten(2, 3)[:, :, :seq_k]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def block_sparse_attention_decompositions() -> dict:
    """The block-sparse ops' entries of ``dilated_attention_decompositions()``."""
    return {
        block_sparse_attention_op: block_sparse_attention_decomposition,
        block_sparse_attention_backward_op: block_sparse_attention_backward_decomposition,
    }
