"""Numerical conventions every implementation of the dilated ops shares."""

from __future__ import annotations

import math

import torch


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-sum-exp output and of the accumulation for inputs of ``dtype``.

    Half-precision inputs are accumulated in float32, as FlashAttention does; float64 stays
    float64 so the exact path can be checked exactly."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The score scale: ``scale``, or ``1/sqrt(head_dim)`` when None."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
