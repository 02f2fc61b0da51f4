"""``torch.ops.dilated_compile.dilated_attention`` and its backward: the public ops.

Both are ``torch.library.triton_op``s. Their bodies pick the implementation:

- CUDA tensors of float16/bfloat16/float32 with head dims 32, 64 or 128: the Triton kernels of
  ``_triton/dilated_attention.py``, launched through ``wrap_triton``. Under ``torch.compile``
  Inductor traces into the body and sees the kernels themselves (they appear in its generated
  code and AOTInductor packages them);
- everything else (CPU, float64, other head dims): the exact PyTorch implementation of
  ``dilated_attention_pytorch.py``, an opaque custom op.

The choice depends only on device, dtype and head dims, never on data, so eager and compiled
runs of one call take the same path. Semantics, shapes and the lse convention are the same on
both paths (docs/usage.md).

Both ops take an optional ``attn_mask`` (bool, True = keep, or float, added to the scores),
broadcastable to ``[B, Hq, Nq, Nk]``, applied on top of the dilated pattern. It is checked here
and handed to the implementations as a 4-D stride-0 view, so they read only the entries of pairs
the pattern keeps. Queries may be fewer than keys (``Nq <= Nk``): query ``i`` stands at position
``Nk - Nq + i`` of the key sequence, and ``is_causal`` is aligned to that position (bottom-right).
Unlike SDPA, the ops take ``is_causal=True`` together with a mask (the pairs both keep), so a
module can add key padding to causal attention without an ``Nq x Nk`` mask; the SDPA-shaped
entry points (``dilated(...)``, ``dilated_attention``) refuse the pair as SDPA does.
"""

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import dilated_attention_pytorch as _pytorch
from ._checks import check_attn_mask_grad, check_op_args, expand_attn_mask, static_ints
from ._numerics import resolve_scale
from ._triton import dilated_attention as _kernels


def uses_triton_kernels(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a call with these inputs runs the Triton kernels (else the PyTorch
    implementation): CUDA, float16/bfloat16/float32, head dims 32/64/128, N > 0."""
    return _kernels.supports(q, k, v) and q.shape[2] > 0


@torch.library.triton_op("dilated_compile::dilated_attention", mutates_args=())
def dilated_attention_forward(
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
    """Dilated attention and its log-sum-exp.

    Shapes: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (Hq % Hkv == 0, Nq <= Nk),
    attn_mask broadcastable to [B, Hq, Nq, Nk] or None -> out [B, Hq, Nq, Dv] in q.dtype,
    lse [B, Hq, Nq] (float32; float64 for float64 inputs; -inf on rows that attend no key)."""
    segment_lengths, dilation_rates = static_ints(segment_lengths), static_ints(dilation_rates)
    check_op_args(q, k, v, segment_lengths, dilation_rates, mode, attn_mask)
    mask = expand_attn_mask(attn_mask, q, k)
    if uses_triton_kernels(q, k, v):
        return _kernels.forward(
            q, k, v, segment_lengths, dilation_rates, mode, is_causal,
            resolve_scale(scale, q.shape[-1]), mask,
        )
    return _pytorch.dilated_attention_pytorch_op(
        q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, mask
    )


@torch.library.triton_op("dilated_compile::dilated_attention_backward", mutates_args=())
def dilated_attention_backward(
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
    """dq, dk, dv of ``dilated_attention`` given dL/dout, dL/dlse (None when the lse is unused),
    the forward's inputs (``attn_mask`` included) and its ``out`` and ``lse``. Deterministic on
    every path; no gradient for the mask."""
    segment_lengths, dilation_rates = static_ints(segment_lengths), static_ints(dilation_rates)
    check_op_args(q, k, v, segment_lengths, dilation_rates, mode, attn_mask)
    mask = expand_attn_mask(attn_mask, q, k)
    if uses_triton_kernels(q, k, v):
        return _kernels.backward(
            grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode,
            is_causal, resolve_scale(scale, q.shape[-1]), mask,
        )
    return _pytorch.dilated_attention_backward_pytorch_op(
        grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode, is_causal,
        scale, mask,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, attn_mask = inputs
    check_attn_mask_grad(attn_mask)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask)
    ctx.pattern = (list(segment_lengths), list(dilation_rates), mode, is_causal, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = dilated_attention_backward_op(
        grad_out, q, k, v, out, lse, grad_lse, *ctx.pattern, attn_mask
    )
    return dq, dk, dv, None, None, None, None, None, None


dilated_attention_forward.register_autograd(_backward, setup_context=_setup_context)

dilated_attention_op = torch.ops.dilated_compile.dilated_attention.default
dilated_attention_backward_op = torch.ops.dilated_compile.dilated_attention_backward.default
