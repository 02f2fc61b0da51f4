"""``torch.ops.dilated_compile.sequence_parallel_attention`` and its backward: what an SDPA call
inside ``sequence_parallel(...)`` becomes in a compiled graph.

The rewrite pass turns a sequence-parallel annotation into this op (``distributed/call.py``);
eager calls inside ``sequence_parallel(...)`` compute the same thing directly, without the op.
Its body is ``distributed.attention.sequence_parallel_attention``: the cross-rank signature
check, the strategy, the collectives and the pattern's op on this rank's rows.

Why one opaque op instead of traced collectives. What the call computes is only known at run
time, after a collective:

- the global length ``N`` is the sum of every rank's local length, which the signature exchange
  (an all-gather read on the host) reveals; ``N`` decides every shape after it (the key window,
  the padding, the block index), so a traced graph would be specialised to one ``N`` of the
  other ranks, which no guard of this rank can check;
- ``strategy="auto"`` picks the strategy per call from ``N`` and the pattern, and the strategies
  use collectives that are not functional (the ring's asynchronous point-to-point exchange);
- the process group is named by ``group.group_name`` (a string, so the graph and its caches
  key on it) and resolved when the op runs, as functional collectives do.

So the graph holds one node per call, with the pattern, strategy, layout and group as arguments;
Dynamo and Inductor trace everything around it, and the fake kernel gives the output's shape
from the local shapes alone.

Autograd. An opaque op cannot keep the autograd graph of its collectives from the forward to the
backward (AOTAutograd splits them into two graphs that hold only tensors), so the backward op
recomputes the forward under ``torch.enable_grad()`` and returns ``torch.autograd.grad`` of it:
compiled training runs the forward's collectives twice. Every rank runs the backward op at the
same point of its backward, so the collectives inside stay matched across ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_attn_mask_grad

# ``pattern`` of a dense call (plain SDPA inside ``sequence_parallel``).
DENSE = "dense"


def _attention(q: Tensor, k: Tensor, v: Tensor, pattern: str, pattern_tensor: Optional[Tensor],
               layout: str, strategy: str, group_name: str, is_causal: bool,
               scale: Optional[float], attn_mask: Optional[Tensor]) -> Tensor:
    # Imported here: the distributed package imports these ops (a cycle at import time), and
    # importing the ops must not need torch.distributed.
    from ..distributed.attention import sequence_parallel_attention
    from ..distributed.call import SequenceParallelCall

    call = SequenceParallelCall.from_op_args(pattern, pattern_tensor, layout, strategy, group_name)
    arguments = {
        "query": q, "key": k, "value": v, "attn_mask": attn_mask, "dropout_p": 0.0,
        "is_causal": is_causal, "scale": scale, "enable_gqa": q.shape[1] != k.shape[1],
    }
    return sequence_parallel_attention(call.pattern, arguments, call)


@torch.library.custom_op("dilated_compile::sequence_parallel_attention", mutates_args=())
def sequence_parallel_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: str,
    pattern_tensor: Optional[Tensor],
    layout: str,
    strategy: str,
    group_name: str,
    is_causal: bool,
    scale: Optional[float],
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """This rank's rows of the attention of the whole sharded sequence (a collective: every rank
    of the group must call it with its own shards).

    Args:
        q, k, v: this rank's shards ``[B, Hq, n_r, D]``, ``[B, Hkv, n_r, D]``, ``[B, Hkv, n_r,
            Dv]`` (``Hq % Hkv == 0``), positions of ``layout``.
        pattern: ``"dense"`` or a spec's JSON (``DilatedSpec``/``BlockSparseSpec.to_json()``).
        pattern_tensor: the tensor the spec carries (a block-sparse layout), else None.
        layout: ``"contiguous"`` or ``"zigzag"``.
        strategy: ``"auto"``, ``"all_gather"``, ``"all_to_all"`` or ``"ring"``.
        group_name: the process group's ``group_name``.
        is_causal, scale: as in SDPA.
        attn_mask: this rank's query rows against every key, ``[B or 1, Hq or 1, n_r or 1, N]``.

    Returns:
        ``[B, Hq, n_r, Dv]``, equal to this rank's rows of the single-device attention of the
        gathered sequence (contiguous)."""
    out = _attention(q, k, v, pattern, pattern_tensor, layout, strategy, group_name, is_causal,
                     scale, attn_mask)
    return out.contiguous()  # the strides the fake kernel promises (rows may be a slice)


@sequence_parallel_attention_forward.register_fake
def _(q, k, v, pattern, pattern_tensor, layout, strategy, group_name, is_causal, scale,
      attn_mask=None):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("dilated_compile::sequence_parallel_attention_backward", mutates_args=())
def sequence_parallel_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: str,
    pattern_tensor: Optional[Tensor],
    layout: str,
    strategy: str,
    group_name: str,
    is_causal: bool,
    scale: Optional[float],
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of ``sequence_parallel_attention`` given dL/dout ``[B, Hq, n_r, Dv]`` and the
    forward's inputs: the forward recomputed under ``torch.enable_grad()`` (its collectives run
    again), differentiated with ``torch.autograd.grad`` (the backward collectives). A collective:
    every rank must call it. It has no backward of its own (no double backward)."""
    with _autograd_below_the_op(), torch.enable_grad():
        inputs = tuple(x.detach().requires_grad_() for x in (q, k, v))
        out = _attention(*inputs, pattern, pattern_tensor, layout, strategy, group_name,
                         is_causal, scale, attn_mask)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    # Fresh contiguous copies, as the fake kernel promises: the grads may be strided slices of
    # one buffer (dk and dv of one gathered key/value gradient), and a custom op's outputs may
    # alias neither its inputs nor each other.
    return tuple(torch.zeros(x.shape, dtype=x.dtype, device=x.device) if g is None
                 else g.clone(memory_format=torch.contiguous_format) for g, x in zip(grads, (q, k, v)))


@contextlib.contextmanager
def _autograd_below_the_op() -> Iterator[None]:
    """Autograd inside an op's body. The dispatcher runs a body below the op's autograd kernel
    with the autograd keys excluded (thread-local), so the ops it calls record no graph; put
    them back for the recompute, and only for it."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        yield


_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView,
)


@sequence_parallel_attention_backward.register_fake
def _(grad_out, q, k, v, pattern, pattern_tensor, layout, strategy, group_name, is_causal, scale,
      attn_mask=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *call, attn_mask = inputs
    check_attn_mask_grad(attn_mask)
    pattern, pattern_tensor, layout, strategy, group_name, is_causal, scale = call
    ctx.save_for_backward(q, k, v, pattern_tensor, attn_mask)
    ctx.call = (pattern, layout, strategy, group_name, is_causal, scale)


def _backward(ctx, grad_out):
    q, k, v, pattern_tensor, attn_mask = ctx.saved_tensors
    pattern, layout, strategy, group_name, is_causal, scale = ctx.call
    dq, dk, dv = sequence_parallel_attention_backward_op(
        grad_out, q, k, v, pattern, pattern_tensor, layout, strategy, group_name, is_causal, scale,
        attn_mask,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


sequence_parallel_attention_forward.register_autograd(_backward, setup_context=_setup_context)

sequence_parallel_attention_op = torch.ops.dilated_compile.sequence_parallel_attention.default
sequence_parallel_attention_backward_op = (
    torch.ops.dilated_compile.sequence_parallel_attention_backward.default
)

__all__ = ["DENSE", "sequence_parallel_attention_backward_op", "sequence_parallel_attention_op"]
