"""Which heads use which configs, and how far back a causal query can reach.

One-token decoding (``decoding.py``) needs these facts beyond the fused op: which configs
keep the new query's row for each head, and which cached keys later queries can still attend.
Both follow the semantics of ``DilatedSpec``.
"""

from __future__ import annotations

import dataclasses

from ..spec import DilatedSpec


@dataclasses.dataclass(frozen=True)
class HeadSlice:
    """Query heads ``heads`` attend under config ``config`` = ``(segment_length,
    dilation_rate)`` with local offset ``offset``."""

    config: int
    segment_length: int
    dilation_rate: int
    offset: int
    heads: slice


def head_slices(spec: DilatedSpec, num_heads: int) -> list[HeadSlice]:
    """Split ``num_heads`` query heads by (config, offset); every slice is non-empty.

    ``mixture``: every head uses every config, head ``h`` with offset ``h mod r`` (so the
    heads of offset ``o`` are the strided slice ``o::r``). ``head_groups``: contiguous groups,
    the first ``H mod G`` one head larger; group ``g`` uses config ``g`` with offset ``g mod r_g``.
    """
    spec.check_num_heads(num_heads)
    slices = []
    if spec.mode == "mixture":
        for i, (w, r) in enumerate(spec.configs):
            for offset in range(min(r, num_heads)):
                slices.append(HeadSlice(i, w, r, offset, slice(offset, num_heads, r)))
        return slices
    base, larger = divmod(num_heads, spec.num_configs)
    start = 0
    for g, (w, r) in enumerate(spec.configs):
        size = base + (1 if g < larger else 0)
        slices.append(HeadSlice(g, w, r, g % r, slice(start, start + size)))
        start += size
    return slices


def window_start(spec: DilatedSpec, position: int) -> int:
    """The first position that a causal query at ``position`` or later can attend.

    A query at ``p`` attends, under config ``(w, r)``, only keys of its own segment
    ``[floor(p / w) * w, p]``; segment starts never decrease with ``p``, so keys before the
    earliest current segment start are never attended again. The window
    ``[window_start(p), p]`` holds at most ``max(segment_lengths)`` positions.
    """
    return min((position // w) * w for w in spec.segment_lengths)
