"""Argument checks of the modules: each error names the argument, its value and the fix."""

from __future__ import annotations

import numbers


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

    Dropping attention weights needs the weights; dilated attention never forms them (that is
    what keeps it linear in the sequence length), and the count-weighted merge of configs has
    no per-config equivalent. In eval mode dropout is the identity, so it is honoured exactly.
    """
    if training and p > 0.0:
        raise NotImplementedError(
            f"{owner}: {argument}={p} cannot be honoured in training mode: dilated attention never "
            "forms the attention-weight matrix that attention dropout drops entries of. Construct "
            f"it with {argument}=0.0 (dropout on the residual branches, the layers' `dropout`, "
            "is supported), or call .eval() for inference, where dropout is the identity."
        )
