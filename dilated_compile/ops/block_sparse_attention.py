"""``torch.ops.dilated_compile.block_sparse_attention`` and its backward: the public ops.

Both are ``torch.library.triton_op``s whose bodies pick the implementation by device, dtype,
head dims and block size only (never by data), like the dilated ops:

- CUDA tensors the kernels support (``_triton/block_sparse_attention.py``: float16/bfloat16/
  float32, head dims 32/64/128, block sizes they tile): the Triton kernels;
- everything else: the exact PyTorch implementation (``block_sparse_attention_pytorch.py``).

The pattern's fields are the op's arguments (``BlockSparseSpec``; ``local_blocks`` None means no
band) and an explicit ``layout`` is a tensor input, so one compiled graph serves every layout of
its shape. The block index is built on the inputs' device from the sequence lengths at run time
(``_block_layout.build_block_index``). ``attn_mask`` (bool, True = keep, or float, added to the
scores; broadcastable to ``[B, Hq, Nq, Nk]``) and ``is_causal`` apply on top of the pattern; as
for the dilated op, the op (not SDPA) takes the two together, and the queries are the last
``Nq <= Nk`` positions (the KV-cache convention; causal aligned bottom-right).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..block_sparse_spec import BlockSparseSpec
from . import block_sparse_attention_pytorch as _pytorch
from ._checks import (
    check_attention_inputs, check_attn_mask, check_attn_mask_grad, expand_attn_mask, static_int,
)
from ._numerics import lse_dtype, resolve_scale
from ._triton import block_sparse_attention as _kernels


def block_sparse_spec_of(block_size, local_blocks, global_blocks, random_blocks, seed, layout):
    """The ``BlockSparseSpec`` of the op's pattern arguments (validating them)."""
    return BlockSparseSpec(
        block_size, local_blocks=local_blocks, global_blocks=global_blocks,
        random_blocks=random_blocks, seed=seed, layout=layout,
    )


def check_block_sparse_args(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed,
                            layout, attn_mask) -> None:
    """Everything the block-sparse ops check when called directly through ``torch.ops``."""
    check_attention_inputs(q, k, v)
    spec = block_sparse_spec_of(block_size, local_blocks, global_blocks, random_blocks, seed, layout)
    spec.check_num_heads(q.shape[1])
    spec.check_length(k.shape[2])
    check_attn_mask(attn_mask, q, k)


def uses_block_sparse_kernels(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> bool:
    """Whether a call with these inputs runs the Triton kernels (else the PyTorch
    implementation)."""
    return _kernels.supports(q, k, v, block_size) and q.shape[2] > 0


@torch.library.triton_op("dilated_compile::block_sparse_attention", mutates_args=())
def block_sparse_attention_forward(
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
    """Block-sparse attention and its log-sum-exp.

    Shapes: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (Hq % Hkv == 0, Nq <= Nk),
    layout None or bool [H or 1, >= Mk, >= Mk] (Mk = ceil(Nk / block_size)), attn_mask
    broadcastable to [B, Hq, Nq, Nk] or None -> out [B, Hq, Nq, Dv] in q.dtype, lse [B, Hq, Nq]
    (float32; float64 for float64 inputs; -inf on rows that attend no key)."""
    block_size, local_blocks, global_blocks, random_blocks, seed = map(
        static_int, (block_size, local_blocks, global_blocks, random_blocks, seed))
    check_block_sparse_args(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed,
                            layout, attn_mask)
    if uses_block_sparse_kernels(q, k, v, block_size):
        return _kernels.forward(
            q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout,
            is_causal, resolve_scale(scale, q.shape[-1]), expand_attn_mask(attn_mask, q, k),
        )
    return _pytorch.block_sparse_attention_pytorch_op(
        q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout, is_causal,
        scale, attn_mask,
    )


@torch.library.triton_op("dilated_compile::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(
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
    """dq, dk, dv of ``block_sparse_attention`` given dL/dout, dL/dlse (None when the lse is
    unused), the forward's inputs and its ``out`` and ``lse``. No gradient for the mask or the
    layout."""
    block_size, local_blocks, global_blocks, random_blocks, seed = map(
        static_int, (block_size, local_blocks, global_blocks, random_blocks, seed))
    check_block_sparse_args(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed,
                            layout, attn_mask)
    if uses_block_sparse_kernels(q, k, v, block_size):
        return _kernels.backward(
            grad_out, q, k, v, out, lse, grad_lse, block_size, local_blocks, global_blocks,
            random_blocks, seed, layout, is_causal, resolve_scale(scale, q.shape[-1]),
            expand_attn_mask(attn_mask, q, k),
        )
    return _pytorch.block_sparse_attention_backward_pytorch_op(
        grad_out, q, k, v, out, lse, grad_lse, block_size, local_blocks, global_blocks,
        random_blocks, seed, layout, is_causal, scale, attn_mask,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, *pattern, is_causal, scale, attn_mask = inputs
    check_attn_mask_grad(attn_mask)
    out, lse = output
    block_size, local_blocks, global_blocks, random_blocks, seed, layout = pattern
    ctx.save_for_backward(q, k, v, out, lse, layout, attn_mask)
    ctx.pattern = (block_size, local_blocks, global_blocks, random_blocks, seed)
    ctx.call = (is_causal, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, layout, attn_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = block_sparse_attention_backward_op(
        grad_out, q, k, v, out, lse, grad_lse, *ctx.pattern, layout, *ctx.call, attn_mask,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


block_sparse_attention_forward.register_autograd(_backward, setup_context=_setup_context)

block_sparse_attention_op = torch.ops.dilated_compile.block_sparse_attention.default
block_sparse_attention_backward_op = torch.ops.dilated_compile.block_sparse_attention_backward.default

__all__ = [
    "block_sparse_attention_backward_op",
    "block_sparse_attention_op",
    "block_sparse_spec_of",
    "lse_dtype",
    "uses_block_sparse_kernels",
]
