"""Which positions of the global sequence each rank holds.

Layouts of a sequence of ``N`` positions over ``W`` ranks:

- ``"contiguous"``: rank ``r`` holds chunk ``r`` of ``c = ceil(N / W)`` positions,
  ``[r*c, min((r+1)*c, N))``; the last ranks may hold fewer positions, even none.
- ``"zigzag"``: the sequence is cut into ``2W`` chunks of ``c = ceil(N / 2W)``; rank ``r`` holds
  chunks ``r`` and ``2W-1-r``, concatenated in that order (which balances causal work).

A rank's local tensor holds its ranges one after the other along the sequence dimension.
"""

from __future__ import annotations

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def chunk_size(n: int, world: int, layout: str) -> int:
    """Positions per chunk (each of a rank's ranges is at most this long)."""
    parts = world if layout == "contiguous" else 2 * world
    return -(-n // parts)


def chunk_ranges(n: int, world: int, layout: str, rank: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s global ``[start, end)`` ranges, in local order (1 or 2 ranges, maybe empty)."""
    c = chunk_size(n, world, layout)
    chunks = [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]
    return [(min(j * c, n), min((j + 1) * c, n)) for j in chunks]


def local_length(n: int, world: int, layout: str, rank: int) -> int:
    """How many positions rank ``rank`` holds."""
    return sum(b - a for a, b in chunk_ranges(n, world, layout, rank))


def global_order(world: int, layout: str) -> list[tuple[int, int]]:
    """``(rank, range index)`` of each chunk of the sequence, in global order."""
    if layout == "contiguous":
        return [(r, 0) for r in range(world)]
    return [(r, 0) for r in range(world)] + [(r, 1) for r in reversed(range(world))]
