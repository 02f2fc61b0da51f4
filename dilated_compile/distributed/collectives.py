"""Differentiable collectives over the sequence dimension.

Every rank's ranges are padded to one chunk length so that the collectives move equal blocks;
the gradient of an all-gather is a reduce-scatter, of an all-to-all the reverse all-to-all, each
run under the collective's name (``errors.named_collective``).

The bytes a rank receives in the forward collectives (and both directions of the ring) are
counted in ``torch._dynamo.utils.counters["dilated_compile"]["sequence_parallel_bytes_<kind>"]``
(``all_gather``, ``all_to_all``, ``ring``), so tests can hold the documented formulas to them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from .errors import named_collective
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


class _Collective(torch.autograd.Function):
    """A collective and the one that carries its gradient, each run under its name: a rank that
    dies makes the others fail naming the collective, in the forward and in the backward alike.

    Plain c10d collectives, not functional ones: the call runs eagerly in every mode (under
    ``torch.compile`` inside the opaque sequence-parallel op), and functional collectives on gloo
    can abort the interpreter's teardown (torch 2.13: "terminate called without an active
    exception")."""

    @staticmethod
    def forward(ctx, x, run, reverse, what, group):
        ctx.reverse, ctx.what, ctx.group = reverse, what, group
        with named_collective(what, group):
            return run(x.contiguous())

    @staticmethod
    def backward(ctx, grad):
        with named_collective(f"{ctx.what}, backward", ctx.group):
            return ctx.reverse(grad.contiguous()), None, None, None, None


# torch 2.13 names them ``all_gather_single``/``reduce_scatter_single`` and deprecates the
# ``*_tensor`` names, the only ones torch 2.11 has.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
    _ALL_GATHER(out, x, group=group)
    return out


def _scatter_sum_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
    _REDUCE_SCATTER(out, x, op=dist.ReduceOp.SUM, group=group)
    return out


def _exchange_rows(x: torch.Tensor, output_sizes, input_sizes, group) -> torch.Tensor:
    rows = x.shape[0] if output_sizes is None else sum(output_sizes)
    out = x.new_empty(rows, *x.shape[1:])
    dist.all_to_all_single(out, x, output_sizes, input_sizes, group=group)
    return out


def gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup, what: str) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` (equal shapes); differentiable: the gradient
    is the reduce-scatter (sum) of the output's. ``what`` names the collective in errors."""
    rows = _Collective.apply(
        x.movedim(dim, 0), lambda t: _gather_rows(t, group),
        lambda g: _scatter_sum_rows(g, group), what, group)
    return rows.movedim(0, dim)


def all_to_all(x: torch.Tensor, output_sizes: list[int] | None, input_sizes: list[int] | None,
               group: dist.ProcessGroup, what: str) -> torch.Tensor:
    """``all_to_all_single`` along dim 0 (``input_sizes[j]`` rows to rank ``j``, ``output_sizes[i]``
    from rank ``i``; None: equal splits); differentiable: the gradient takes the reverse
    all-to-all. ``what`` names the collective in errors."""
    return _Collective.apply(
        x, lambda t: _exchange_rows(t, output_sizes, input_sizes, group),
        lambda g: _exchange_rows(g, input_sizes, output_sizes, group), what, group)


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
    gathered = gather_along(packed, dim, group, what)
    blocks = list(torch.chunk(gathered, world, dim=dim))
    return assemble(blocks, n, world, layout, dim)


def all_to_all_rows(x: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    """``x`` is ``[W, E]``: row ``j`` goes to rank ``j``; returns ``[W, E]``, row ``i`` from rank
    ``i``. Differentiable (the backward is the reverse all-to-all)."""
    if world == 1:
        return x
    count_received("all_to_all", (world - 1) * x[0].numel() * x.element_size())
    return all_to_all(x, None, None, group,
                      "sequence_parallel: the all-to-all of the shards (strategy 'all_to_all')")
