"""Differentiable collectives over the sequence dimension (functional collectives).

Every rank's ranges are padded to one chunk length so that the collectives move equal blocks
(``torch.distributed._functional_collectives``, whose autograd the backward uses: the gradient
of an all-gather is a reduce-scatter, of an all-to-all the reverse all-to-all).

The bytes a rank receives in the forward collectives (and both directions of the ring) are
counted in ``torch._dynamo.utils.counters["dilated_compile"]["sequence_parallel_bytes_<kind>"]``
(``all_gather``, ``all_to_all``, ``ring``), so tests can hold the documented formulas to them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch._dynamo.utils import counters

from .errors import named_collective, settle
from .layout import chunk_ranges, chunk_size, global_order


def count_received(kind: str, nbytes: int) -> None:
    """Add ``nbytes`` received by this rank to the ``sequence_parallel_bytes_<kind>`` counter."""
    counters["dilated_compile"][f"sequence_parallel_bytes_{kind}"] += int(nbytes)


def pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` zero-padded at the end of ``dim`` to ``size``."""
    missing = size - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def pack_ranges(x: torch.Tensor, n: int, world: int, layout: str, rank: int, dim: int) -> torch.Tensor:
    """A rank's local tensor (its ranges back to back along ``dim``) -> each range padded to the
    chunk length: ``R * c`` along ``dim``."""
    c = chunk_size(n, world, layout)
    pieces, start = [], 0
    for a, b in chunk_ranges(n, world, layout, rank):
        pieces.append(pad_dim(x.narrow(dim, start, b - a), dim, c))
        start += b - a
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]


def unpack_ranges(x: torch.Tensor, n: int, world: int, layout: str, rank: int, dim: int) -> torch.Tensor:
    """The inverse of ``pack_ranges``: drop the padding."""
    c = chunk_size(n, world, layout)
    pieces = [x.narrow(dim, i * c, b - a) for i, (a, b) in enumerate(chunk_ranges(n, world, layout, rank))]
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]


def assemble(blocks: list[torch.Tensor], n: int, world: int, layout: str, dim: int) -> torch.Tensor:
    """The global sequence from every rank's packed block (``blocks[r]``, ``R * c`` along ``dim``)."""
    c = chunk_size(n, world, layout)
    pieces = []
    for rank, index in global_order(world, layout):
        a, b = chunk_ranges(n, world, layout, rank)[index]
        pieces.append(blocks[rank].narrow(dim, index * c, b - a))
    return torch.cat(pieces, dim=dim)


def _all_gather_autograd(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The differentiable functional all-gather along ``dim``: ``all_gather_single_autograd`` in
    torch 2.13, which deprecates ``all_gather_tensor_autograd``, its only name in torch 2.11."""
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return gather(x, dim, group)


def all_gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup, n: int, world: int, layout: str, rank: int, dim: int,
    *, what: str = "sequence_parallel: the all-gather of keys and values (strategy 'all_gather')",
) -> torch.Tensor:
    """The global tensor (``n`` along ``dim``) from every rank's shard; differentiable: each rank
    gets the sum over ranks of the gradients of its positions (a reduce-scatter). ``what`` names
    the collective in the error raised when it fails (``errors.named_collective``)."""
    dim = dim % x.dim()
    packed = pack_ranges(x, n, world, layout, rank, dim).contiguous()
    if world == 1:
        return unpack_ranges(packed, n, world, layout, rank, dim)
    count_received("all_gather", (world - 1) * packed.numel() * packed.element_size())
    with named_collective(what, group):
        # Waited for here, not at its first use, so that a failure is raised under its name.
        gathered = settle(_all_gather_autograd(packed, dim, group))
    blocks = list(torch.chunk(gathered, world, dim=dim))
    return assemble(blocks, n, world, layout, dim)


def all_to_all_rows(x: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    """``x`` is ``[W, E]``: row ``j`` goes to rank ``j``; returns ``[W, E]``, row ``i`` from rank
    ``i``. Differentiable (the backward is the reverse all-to-all)."""
    if world == 1:
        return x
    count_received("all_to_all", (world - 1) * x[0].numel() * x.element_size())
    with named_collective("sequence_parallel: the all-to-all of the shards (strategy 'all_to_all')", group):
        return settle(fc.all_to_all_single_autograd(x.contiguous(), None, None, group))
