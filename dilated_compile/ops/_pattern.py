"""Which heads attend which positions under each config: the index plan shared by every
implementation of the dilated ops (the PyTorch one here, the kernels later).

Dilated attention decomposes into independent dense attention problems. For config ``(w, r)``
on a sequence of length ``N`` the effective segment length is ``min(w, N)``; a head with offset
``o`` sees, in each segment, the local indices ``o, o + r, o + 2r, ...``. Heads that share a
config and an offset share the same rows, so they are processed together as one head slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class HeadPart:
    """Query heads ``heads`` attend under config ``config`` = (segment_length, rate) with
    local offset ``offset``."""

    config_index: int
    segment_length: int
    dilation_rate: int
    offset: int
    heads: slice


@dataclasses.dataclass(frozen=True)
class SegmentBlock:
    """``num_segments`` consecutive segments of ``segment_length`` positions from ``start``."""

    start: int
    num_segments: int
    segment_length: int


def head_parts(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, num_heads: int
) -> list[HeadPart]:
    """Split the query heads by (config, offset). Every returned slice is non-empty."""
    parts = []
    configs = list(zip(segment_lengths, dilation_rates))
    if mode == "mixture":
        # Head h uses offset h mod r: heads of one offset form the strided slice o::r.
        for i, (w, r) in enumerate(configs):
            for offset in range(min(r, num_heads)):
                parts.append(HeadPart(i, w, r, offset, slice(offset, num_heads, r)))
    elif mode == "head_groups":
        groups = len(configs)
        base, larger = divmod(num_heads, groups)
        start = 0
        for g, (w, r) in enumerate(configs):
            size = base + (1 if g < larger else 0)
            parts.append(HeadPart(g, w, r, g % r, slice(start, start + size)))
            start += size
    else:
        raise ValueError(f"mode must be 'mixture' or 'head_groups', got {mode!r}")
    return parts


def segment_blocks(segment_length: int, seq_len: int, query_start: int = 0) -> Iterator[SegmentBlock]:
    """The segments of ``[0, seq_len)`` that hold a query position (``>= query_start``), in
    blocks whose segments share a length and the same first query row:

    - the segment that holds ``query_start`` alone, when that position is not its first one
      (its rows before ``query_start`` are keys only);
    - the following full segments as one block;
    - the shorter last segment (if any) alone.

    With ``query_start = 0`` (as many queries as keys) that is every full segment as one block,
    then the shorter last one. Segments before ``query_start`` hold no query, so they are never
    visited: decoding one query against a long cache costs one segment per config."""
    w = min(segment_length, seq_len)
    if w == 0 or query_start >= seq_len:
        return
    full = seq_len // w
    first = query_start // w  # the first segment with a query
    if first < full and query_start > first * w:
        yield SegmentBlock(first * w, 1, w)
        first += 1
    if first < full:
        yield SegmentBlock(first * w, full - first, w)
    if seq_len - full * w:
        yield SegmentBlock(full * w, 1, seq_len - full * w)


def segment_rows(
    x: torch.Tensor, dim: int, block: SegmentBlock, start: int, first: int, step: int
) -> torch.Tensor:
    """View ``x`` along ``dim`` at the rows ``first, first + step, ...`` (``< segment_length``)
    of each segment of ``block``, where index ``i`` of ``dim`` holds position ``start + i``:
    ``dim`` becomes ``[num_segments, rows]``. A strided view, so in-place updates reach ``x``.

    ``start`` may be positive (``x`` holds the last positions only, e.g. the queries of a KV
    cache) as long as the first viewed row is in ``x``; a block of several segments must lie in
    ``x`` entirely."""
    dim = dim % x.dim()
    offset = block.start - start
    if block.num_segments == 1:  # may begin before x does: take only the rows from ``first``
        rows = x.narrow(dim, offset + first, block.segment_length - first).unsqueeze(dim)
        first = 0
    else:
        length = block.num_segments * block.segment_length
        rows = x.narrow(dim, offset, length).unflatten(
            dim, (block.num_segments, block.segment_length)
        )
    index = (slice(None),) * (dim + 1) + (slice(first, None, step),)
    return rows[index]


def kv_head_index(heads: slice, num_q_heads: int, num_kv_heads: int) -> slice | torch.Tensor:
    """KV heads of the query heads ``heads`` (GQA: query head h uses kv head h // group).
    A slice when the mapping is the identity, else an index tensor for ``index_select``."""
    if num_q_heads == num_kv_heads:
        return heads
    group = num_q_heads // num_kv_heads
    return torch.arange(num_q_heads)[heads] // group
