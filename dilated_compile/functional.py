"""``dilated_attention``: the functional form, in the SDPA layout."""

from __future__ import annotations

import torch

from .ops import dilated_attention_op
from .ops._checks import (
    check_attention_inputs,
    check_attn_mask,
    check_attn_mask_grad,
    check_sdpa_mask_and_causal,
)
from .spec import DilatedSpec


def dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: DilatedSpec,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Dilated attention (LongNet) of ``query`` over ``key``/``value``.

    Args:
        query: ``[B, Hq, Nq, D]``; ``Nq <= Nk``: query ``i`` stands at position ``Nk - Nq + i``
            of the key sequence (the KV-cache convention), so the rows equal the last ``Nq``
            rows of the full forward.
        key: ``[B, Hkv, Nk, D]``; ``Hq % Hkv == 0``, query head ``h`` uses kv head
            ``h // (Hq // Hkv)`` (needs ``enable_gqa=True`` when ``Hkv != Hq``).
        value: ``[B, Hkv, Nk, Dv]``.
        spec: the pattern (``DilatedSpec``).
        attn_mask: bool (True = keep) or float (added to the scores), broadcastable to
            ``[B, Hq, Nq, Nk]``, applied on top of the pattern (it only removes pairs or shifts
            scores); no gradient flows to it. Not together with ``is_causal``.
        is_causal: keep only keys at or before the query's position (aligned bottom-right
            when ``Nq < Nk``, like ``torch.nn.attention.bias.causal_lower_right``).
        scale: score scale; ``1/sqrt(D)`` when None.
        enable_gqa: allow fewer key/value heads than query heads.

    Returns:
        ``[B, Hq, Nq, Dv]`` in ``query.dtype``. Rows that attend no key (every config dilates
        a head's row away, or the mask removes every kept key) are 0.

    Inside ``sequence_parallel(...)`` the tensors are this rank's shards and the result is this
    rank's rows of the whole sequence's attention, as SDPA inside ``dilated(spec)`` computes it
    there (``attn_mask``: this rank's rows against every key).

    Example::

        >>> spec = DilatedSpec(segment_lengths=(32, 64), dilation_rates=(1, 2))
        >>> q = k = v = torch.randn(2, 4, 100, 16)
        >>> dilated_attention(q, k, v, spec, is_causal=True).shape
        torch.Size([2, 4, 100, 16])
        >>> keep = torch.ones(2, 1, 1, 100, dtype=torch.bool)
        >>> keep[1, ..., :30] = False                          # left padding of the second row
        >>> dilated_attention(q, k, v, spec, attn_mask=keep).shape
        torch.Size([2, 4, 100, 16])
    """
    if not isinstance(spec, DilatedSpec):
        raise TypeError(f"spec must be a DilatedSpec, got {type(spec).__name__}: {spec!r}")
    from .distributed.context import sequence_parallel_is_open

    if sequence_parallel_is_open():
        # The tensors are this rank's shards: the whole sequence's attention, as annotated SDPA.
        from .annotation import dilated

        with dilated(spec):
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa)
    check_attention_inputs(query, key, value, enable_gqa=enable_gqa)
    check_attn_mask(attn_mask, query, key)
    check_sdpa_mask_and_causal(attn_mask, is_causal)
    check_attn_mask_grad(attn_mask)
    spec.check_num_heads(query.shape[1])
    out, _ = dilated_attention_op(
        query, key, value, list(spec.segment_lengths), list(spec.dilation_rates), spec.mode,
        is_causal, scale, attn_mask,
    )
    return out
