"""The global positions of this rank's shard of the sequence.

A position embedding (rotary, xPos) applied to a shard must use the positions the shard's rows
have in the whole sequence, not ``arange(local length)``: with the zigzag layout rank ``r`` of
``W`` holds chunks ``r`` and ``2W-1-r``, so its rows are two runs of positions. They depend on the
global length ``N``, the sum of the ranks' local lengths, which no rank knows alone (13 or 11
positions over 2 zigzag ranks leave rank 0 with 5 either way): one small all-gather finds it.
"""

from __future__ import annotations

from typing import Any

import torch

from .context import _OPEN
from .group import rank_and_size, resolve_group
from .layout import check_layout, chunk_ranges
from .shard import global_length


@torch._dynamo.disable  # a collective whose result decides shapes: run eagerly, a graph break
def sequence_positions(
    local_length: int,
    group: Any = None,
    *,
    layout: str = "contiguous",
    n: int | None = None,
    device: Any = None,
) -> torch.Tensor:
    """This rank's global positions, in local order: LongTensor ``[local_length]``.

    A collective when ``n`` is None: every rank of ``group`` must call it (an all-gather of one
    int64 finds ``N``, the sum of the ranks' local lengths).

    Args:
        local_length: ``n_r``, this rank's shard's size along the sequence.
        group: a ProcessGroup, a 1-D DeviceMesh or None (the world).
        layout: the layout of the shards (see ``shard_sequence``).
        n: the global length when known (skips the all-gather; then only this rank's own length
            is checked against it, and a mismatch raises on this rank alone).
        device: where the positions go, and where the all-gather runs (CPU for gloo, the current
            GPU for NCCL); CPU when None.

    Raises:
        ValueError: the same on every rank, when the local lengths are not the ``layout``
            sharding of their sum (shards cut other than by ``shard_sequence``), or when ``n`` is
            given and this rank's length is not its share of it.

    Example (2 ranks, zigzag, ``N = 12``: chunks of 3, rank 0 holds chunks 0 and 3)::

        >>> sequence_positions(6, layout="zigzag")       # rank 0
        tensor([ 0,  1,  2,  9, 10, 11])
        >>> sequence_positions(6, layout="zigzag")       # rank 1
        tensor([3, 4, 5, 6, 7, 8])
    """
    check_layout(layout)
    pg = resolve_group(group)
    rank, world = rank_and_size(pg)
    device = torch.device("cpu") if device is None else torch.device(device)
    n = global_length(local_length, pg, layout, n, device=device, caller="sequence_positions")
    ranges = chunk_ranges(n, world, layout, rank)
    return torch.cat([torch.arange(a, b, dtype=torch.long, device=device) for a, b in ranges])


def context_positions(local_length: int, device: Any = None) -> torch.Tensor | None:
    """This rank's global positions under the innermost open ``sequence_parallel`` context (its
    group and layout), or None when no context is open: what a module applies to its rows. A
    collective inside a context (see ``sequence_positions``)."""
    if not _OPEN:
        return None
    context = _OPEN[-1]
    return sequence_positions(local_length, context.group, layout=context.layout, device=device)
