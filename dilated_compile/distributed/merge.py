"""Merging partial attention results by their log-sum-exp.

Partial results of one query row over disjoint parts of its keys (or, for dilated ``mixture``,
over the configs: DESIGN's ``c[p, t]`` weighting) combine as ``out = sum_s softmax_s(lse) out_s``.
"""

from __future__ import annotations

import torch


def merge_by_lse(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """``outs`` ``[B, S, R, Dv]`` and ``lses`` ``[B, S, R]`` (``S`` partial results of ``R`` rows;
    ``-inf`` where a part has no key) -> ``[B, R, Dv]``; differentiable in both. A row that no
    part reaches (``-inf`` everywhere) gives 0: its zero outputs are weighed by finite numbers, so
    neither the weights nor their gradients are NaN."""
    live = torch.isfinite(lses).any(dim=1, keepdim=True)
    weights = torch.softmax(torch.where(live, lses, torch.zeros_like(lses)), dim=1)
    return (outs * weights.unsqueeze(-1)).sum(dim=1)
