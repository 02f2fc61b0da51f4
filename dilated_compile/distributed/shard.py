"""``shard_sequence`` / ``gather_sequence``: split a full tensor into this rank's shard of the
sequence, and reassemble the full tensor from every rank's shard."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .collectives import all_gather_sequence
from .errors import named_collective
from .group import rank_and_size, resolve_group
from .layout import chunk_ranges, check_layout, local_length


def shard_sequence(
    x: torch.Tensor, group: Any = None, *, layout: str = "contiguous", dim: int = 2
) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (the sequence, dim 2 of
    ``[B, H, N, D]``).

    Args:
        x: the full tensor, the same on every rank (``N`` positions along ``dim``).
        group: a ProcessGroup, a 1-D DeviceMesh or None (the world).
        layout: ``"contiguous"`` (rank ``r`` holds chunk ``r`` of ``ceil(N / W)``; the last ranks
            may hold fewer positions, even none) or ``"zigzag"`` (chunks ``r`` and ``2W-1-r`` of
            ``2W`` chunks of ``ceil(N / 2W)``, concatenated).
        dim: the sequence dimension.

    Returns:
        ``x``'s positions of this rank, in local order (a copy for zigzag, a view otherwise);
        differentiable (the full tensor's gradient on this rank is this shard's, elsewhere 0).
        No communication.

    Example::

        >>> q_local = shard_sequence(q, layout="zigzag")       # q: [B, H, N, D] on every rank
    """
    check_layout(layout)
    rank, world = rank_and_size(resolve_group(group))
    dim = dim % x.dim()
    pieces = [x.narrow(dim, a, b - a) for a, b in chunk_ranges(x.shape[dim], world, layout, rank)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def gathered_length(
    local: int, group: dist.ProcessGroup, layout: str, device: Any = "cpu", *,
    caller: str = "gather_sequence",
) -> int:
    """The global length from every rank's local length (one small all-gather); ValueError, the
    same on every rank, when the lengths are not a ``layout`` sharding of their sum. ``caller``
    names the function in the error raised when the all-gather fails."""
    rank, world = rank_and_size(group)
    mine = torch.tensor([local], dtype=torch.int64, device=device)
    lengths = [torch.empty_like(mine) for _ in range(world)]
    with named_collective(f"{caller}: the all-gather of the ranks' local lengths", group):
        dist.all_gather(lengths, mine, group=group)
    per_rank = [int(t.item()) for t in lengths]
    check_lengths(per_rank, layout)
    return sum(per_rank)


def global_length(
    local: int, group: dist.ProcessGroup, layout: str, n: int | None, *, device: Any, caller: str,
    what: str = "positions",
) -> int:
    """``N``: ``n`` when given (this rank's ``local`` checked against its share: ValueError on
    this rank alone), else from every rank's local length (``gathered_length``, a collective)."""
    if n is None:
        return gathered_length(local, group, layout, device=device, caller=caller)
    rank, world = rank_and_size(group)
    share = local_length(n, world, layout, rank)
    if local != share:
        raise ValueError(
            f"{caller}: rank {rank} holds {local} {what}, but the {layout!r} layout of n={n} over "
            f"{world} ranks gives it {share}"
        )
    return n


def check_lengths(per_rank: list[int], layout: str) -> None:
    """ValueError when the ranks' local lengths are not a ``layout`` sharding of their sum."""
    n, world = sum(per_rank), len(per_rank)
    expected = [local_length(n, world, layout, r) for r in range(world)]
    if per_rank != expected:
        raise ValueError(
            f"sequence shards: the ranks hold {per_rank} positions, which is not the {layout!r} "
            f"layout of their sum N={n} over {world} ranks (that is {expected}); shard with "
            f"shard_sequence(x, layout={layout!r}) on every rank"
        )


def gather_sequence(
    x: torch.Tensor,
    group: Any = None,
    *,
    layout: str = "contiguous",
    dim: int = 2,
    n: int | None = None,
) -> torch.Tensor:
    """The full tensor from every rank's shard along ``dim`` (the inverse of ``shard_sequence``);
    a collective: every rank of ``group`` must call it.

    Args:
        x: this rank's shard (``layout``'s positions of this rank, along ``dim``).
        group: a ProcessGroup, a 1-D DeviceMesh or None (the world).
        layout: the layout the shards follow (see ``shard_sequence``).
        dim: the sequence dimension.
        n: the global length. None: derived from the ranks' local lengths with one extra small
            all-gather of an int64 (``N`` = their sum; they must follow ``layout``, else
            ValueError on every rank). Give it when known to skip that collective.

    Returns:
        The full tensor (``N`` along ``dim``), the same on every rank. Differentiable: the
        gradient of a rank's shard is the sum, over ranks, of the gradients of its positions in
        their full tensors (a reduce-scatter).

    Per-rank traffic: ``W * ceil(N / W) * (elements per position)`` received (zigzag: ``2W *
    ceil(N / 2W)``), the shards padded to equal lengths.
    """
    check_layout(layout)
    pg = resolve_group(group)
    rank, world = rank_and_size(pg)
    dim = dim % x.dim()
    n = global_length(x.shape[dim], pg, layout, n, device=x.device, caller="gather_sequence",
                      what=f"positions along dim {dim}")
    return all_gather_sequence(x, pg, n, world, layout, rank, dim,
                               what="gather_sequence: the all-gather of the shards")
