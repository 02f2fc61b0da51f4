"""Argument checks of the modules: each error names the argument, its value and the fix."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ..attention_family import family_of_spec, spec_type_names
from ..spec import DilatedSpec


def check_probability(owner: str, argument: str, p: object) -> float:
    """``p`` as a float in ``[0, 1)``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{owner}: {argument} must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_positive_int(owner: str, argument: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {argument} must be a positive int, got {value!r}")
    return int(value)


def check_attention_dropout(owner: str, argument: str, p: float, training: bool) -> None:
    """Refuse attention dropout in training mode rather than silently skipping it.

    Dropping attention weights needs the weights; the fused sparse attention ops (dilated and
    block-sparse) never form them (that is what keeps their cost below ``N^2``), and the
    count-weighted merge of dilated configs has no per-config equivalent. In eval mode dropout is
    the identity, so it is honoured exactly.
    """
    if training and p > 0.0:
        raise NotImplementedError(
            f"{owner}: {argument}={p} cannot be honoured in training mode: sparse attention (dilated "
            "or block-sparse) never forms the attention-weight matrix that attention dropout drops "
            f"entries of. Construct it with {argument}=0.0 (dropout on the residual branches, the "
            "layers' `dropout`, is supported), or call .eval() for inference, where dropout is the "
            "identity."
        )


def resolve_attention_spec(
    owner: str,
    spec: Any,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    mode: str,
) -> Any:
    """The attention pattern of a module, given one of two ways: ``segment_lengths``,
    ``dilation_rates`` (and ``mode``) for a ``DilatedSpec``, or ``spec=`` holding a spec of any
    registered family (``DilatedSpec``, ``BlockSparseSpec``). TypeError naming both ways when
    neither or both are given."""
    ways = (
        "segment_lengths=..., dilation_rates=... (and mode=...) for dilated attention, or "
        "spec=DilatedSpec(...) / spec=BlockSparseSpec(...)"
    )
    if spec is None:
        if segment_lengths is None or dilation_rates is None:
            raise TypeError(
                f"{owner}: give the attention pattern one way: {ways}; got "
                f"segment_lengths={segment_lengths!r}, dilation_rates={dilation_rates!r} and no spec"
            )
        return DilatedSpec(segment_lengths, dilation_rates, mode)
    if segment_lengths is not None or dilation_rates is not None or mode != "mixture":
        raise TypeError(
            f"{owner}: give the attention pattern one way, not both: {ways}; got spec={spec!r} "
            f"and segment_lengths={segment_lengths!r}, dilation_rates={dilation_rates!r}, "
            f"mode={mode!r}"
        )
    try:
        family_of_spec(spec)
    except TypeError:
        raise TypeError(
            f"{owner}: spec must be a {' or a '.join(spec_type_names())}, got "
            f"{type(spec).__name__}: {spec!r}"
        ) from None
    return spec


def check_bounded_decoding(owner: str, spec: Any) -> None:
    """Refuse bounded-cache decoding for a pattern it is not defined for: the cache keeps the
    window a causal dilated query can still reach, which only ``DilatedSpec`` bounds."""
    if not isinstance(spec, DilatedSpec):
        raise NotImplementedError(
            f"{owner}: decoding with a bounded cache is defined for dilated attention (DilatedSpec) "
            f"only; this module computes {spec!r}, whose queries may reach blocks arbitrarily far "
            "back (global or random blocks, an explicit layout). Call forward on the whole sequence "
            "(is_causal=True) and read the rows of the new tokens instead."
        )
