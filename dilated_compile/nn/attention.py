"""``DilatedAttention``: dilated attention as a module, in the ``[B, N, H, D]`` layout.

It is written the way this library wants models written: the plain
``F.scaled_dot_product_attention`` call inside ``dilated(spec)``. Eager mode runs the fused op
at once; ``torch.compile(backend="dilated_compile")`` captures the annotated call and rewrites it.
``attend`` does the same for the spec of any attention family (the modules' one call site).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import annotation, block_sparse_annotation  # noqa: F401 (register the families attend opens)
from ..attention_family import family_of_spec
from ..distributed.context import refuse_inside_sequence_parallel
from ..spec import DilatedSpec
from ._checks import check_attention_dropout, check_probability


def attend(
    spec: Any, query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool,
    scale: float | None = None, attn_mask: Tensor | None = None,
) -> Tensor:
    """Sparse attention of ``[B, H, N, D]`` tensors under ``spec`` (a ``DilatedSpec``, a
    ``BlockSparseSpec`` or any registered family's spec; GQA from the shapes), restricted further
    by ``attn_mask`` when given (SDPA's convention: bool True = keep, or float added to the
    scores, broadcastable to ``[B, Hq, Nq, Nk]``; no gradient flows to it).

    Annotated SDPA inside the region of ``spec``'s family (``dilated(spec)``,
    ``block_sparse(spec)``), which ``torch.compile(backend="dilated_compile")`` rewrites into the
    family's op, except for a mask together with ``is_causal=True``: SDPA refuses that pair, so
    the family's op (which keeps the pairs both keep) is called directly, and causal key padding
    needs no ``N x N`` mask. Returns ``[B, Hq, Nq, Dv]``.

    Example::

        >>> q = k = v = torch.randn(2, 4, 300, 32)
        >>> attend(DilatedSpec((64, 128), (1, 2)), q, k, v, is_causal=True).shape
        torch.Size([2, 4, 300, 32])
        >>> attend(BlockSparseSpec(64, local_blocks=1), q, k, v, is_causal=False).shape
        torch.Size([2, 4, 300, 32])
    """
    family = family_of_spec(spec)
    if attn_mask is not None and is_causal:
        refuse_inside_sequence_parallel("attend(...) with attn_mask and is_causal=True")
        pattern = family.pattern_args(spec, family.spec_tensor(spec))
        out, _ = family.op(query, key, value, *pattern, True, scale, attn_mask)
        return out
    with family.region(spec):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )


class DilatedAttention(nn.Module):
    """Dilated attention (LongNet, Ding et al. 2023) of ``[B, N, H, D]`` tensors.

    Args:
        segment_lengths: ``w_i`` per config (``min(w_i, N)`` on a sequence of length ``N``).
        dilation_rates: ``r_i`` per config, ``1 <= r_i <= w_i``.
        softmax_scale: score scale; ``1/sqrt(D)`` when None.
        attention_dropout: must be 0 in training mode (``NotImplementedError`` otherwise:
            dilated attention never forms the weights that attention dropout drops); in eval
            mode dropout is the identity, so any value is honoured.
        mode: ``"mixture"`` (LongNet eq. 10: every head uses every config, configs merged by
            their softmax denominators) or ``"head_groups"`` (one contiguous head group per
            config, the layout of earlier PyTorch ports). See ``DilatedSpec``.

    ``forward(query, key, value, is_causal=False)``: ``query`` ``[B, N, Hq, D]``, ``key``
    ``[B, N, Hkv, D]``, ``value`` ``[B, N, Hkv, Dv]`` (``Hq % Hkv == 0``: grouped-query attention
    when ``Hkv < Hq``); returns ``[B, N, Hq, Dv]``. Query and key/value share ``N``; any ``N``
    works (the last segment of a config may be shorter). Exact: the same numbers as
    ``dilated_compile.dilated_attention`` on the transposed tensors.

    Example::

        >>> attention = DilatedAttention(segment_lengths=(2048, 4096, 8192), dilation_rates=(1, 2, 4))
        >>> q = k = v = torch.randn(1, 10_000, 8, 64)                  # [B, N, H, D]
        >>> attention(q, k, v, is_causal=True).shape
        torch.Size([1, 10000, 8, 64])
        >>> fast = torch.compile(attention, backend="dilated_compile")  # rewritten into the op
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        mode: str = "mixture",
    ) -> None:
        super().__init__()
        self.spec = DilatedSpec(segment_lengths, dilation_rates, mode)
        if softmax_scale is not None and not softmax_scale > 0:
            raise ValueError(
                f"DilatedAttention: softmax_scale must be positive or None, got {softmax_scale!r}"
            )
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        self.attention_dropout = check_probability("DilatedAttention", "attention_dropout", attention_dropout)

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return self.spec.segment_lengths

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        return self.spec.dilation_rates

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.spec.segment_lengths}, dilation_rates={self.spec.dilation_rates}, "
            f"mode={self.spec.mode!r}, softmax_scale={self.softmax_scale}, "
            f"attention_dropout={self.attention_dropout}"
        )

    def forward(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False) -> Tensor:
        check_attention_dropout(
            "DilatedAttention", "attention_dropout", self.attention_dropout, self.training
        )
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"DilatedAttention: {name} must be 4-D [batch, seq_len, heads, head_dim], got "
                    f"{shape}; for the SDPA layout [batch, heads, seq_len, head_dim] call "
                    "dilated_compile.dilated_attention or SDPA inside dilated(...)"
                )
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        out = attend(self.spec, q, k, v, is_causal=is_causal, scale=self.softmax_scale)
        return out.transpose(1, 2)
