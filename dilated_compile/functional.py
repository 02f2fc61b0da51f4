"""``dilated_attention``: the functional form, in the SDPA layout."""

from __future__ import annotations

import torch

from .ops import dilated_attention_op
from .ops._checks import check_attention_inputs
from .spec import DilatedSpec


def dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: DilatedSpec,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Dilated attention (LongNet) of ``query`` over ``key``/``value``.

    Args:
        query: ``[B, Hq, N, D]``.
        key: ``[B, Hkv, N, D]``; ``Hq % Hkv == 0``, query head ``h`` uses kv head
            ``h // (Hq // Hkv)`` (needs ``enable_gqa=True`` when ``Hkv != Hq``).
        value: ``[B, Hkv, N, Dv]``.
        spec: the pattern (``DilatedSpec``).
        is_causal: keep only keys at or before the query position.
        scale: score scale; ``1/sqrt(D)`` when None.
        enable_gqa: allow fewer key/value heads than query heads.

    Returns:
        ``[B, Hq, N, Dv]`` in ``query.dtype``. Rows that attend no key (possible when every
        config dilates a head's row away) are 0.

    Example::

        >>> spec = DilatedSpec(segment_lengths=(32, 64), dilation_rates=(1, 2))
        >>> q = k = v = torch.randn(2, 4, 100, 16)
        >>> dilated_attention(q, k, v, spec, is_causal=True).shape
        torch.Size([2, 4, 100, 16])
    """
    if not isinstance(spec, DilatedSpec):
        raise TypeError(f"spec must be a DilatedSpec, got {type(spec).__name__}: {spec!r}")
    check_attention_inputs(query, key, value, enable_gqa=enable_gqa)
    spec.check_num_heads(query.shape[1])
    out, _ = dilated_attention_op(
        query, key, value, list(spec.segment_lengths), list(spec.dilation_rates), spec.mode,
        is_causal, scale,
    )
    return out
