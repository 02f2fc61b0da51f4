"""The ``"all_to_all"`` strategy (DeepSpeed-Ulysses): trade the sequence shard for a head shard.

One all-to-all turns every rank's ``[B, H, n_r, D]`` q/k/v shards into the full sequence of
``H / W`` heads (rank ``r`` gets heads ``[r*H/W, (r+1)*H/W)``), the pattern's op runs on it,
and a second all-to-all returns the rows. A rank's heads see the pattern they have in the whole:
dense trivially; block-sparse through the explicit layout of the rank's heads (per-head random
blocks or layouts); dilated through the op itself when the offsets line up (``mixture`` with
``(Hq / W) % lcm(dilation_rates) == 0``: head ``h`` uses offset ``h mod r``), else through
``head_subset`` (one op call per (config, offset) part of the whole head set that meets the
rank's heads; ``head_groups`` included). Needs ``Hq % W == 0``; with ``Hkv % W != 0`` each
key/value head is repeated the fewest times that makes them split. ``attn_mask``: a key-padding
mask (one row for every query) is used as it is; a mask with rows takes one more all-to-all, of
each rank's rows for the receiver's heads, ``(W - 1) / W * c * B' * H' * N * m`` bytes (``B'``,
``H'``: the mask's batch and head dims, per rank ``H' / W`` when it has every head; ``m`` its
element size).

Per-rank traffic (bytes received): ``(W - 1) / W * c * B * (Hq * D + Hkv' * (D + Dv)) *
itemsize`` forward plus ``(W - 1) / W * c * B * Hq * Dv * itemsize`` on the way back (``c``:
padded positions per rank, ``Hkv'`` the key/value heads after repetition); the backward moves
the same.
"""

from __future__ import annotations

import math

import torch

from ..block_sparse_spec import BlockSparseSpec
from ..ops._block_layout import EagerCache
from .collectives import all_to_all_rows, assemble, pack_ranges, unpack_ranges
from .head_subset import dilated_head_subset_attention
from .plan import Plan, block_layout_tensor, pattern_attention


def _others(plan: Plan) -> str:
    """The other strategies that compute ``plan``'s call exactly, for error messages."""
    if plan.kind == "dilated":
        return "strategy='all_gather'"
    if plan.kind == "block_sparse" and not plan.is_causal:
        return "strategy='ring'"
    return "strategy='all_gather' or 'ring'"


def check_all_to_all(plan: Plan, q_heads: int) -> None:
    """ValueError naming the reason and the strategies to use, when this call is not exact."""
    w = plan.world
    if q_heads % w:
        raise ValueError(
            f"sequence_parallel(strategy='all_to_all') splits the {q_heads} query heads over "
            f"{w} ranks: they must be a multiple of {w}; use {_others(plan)}"
        )


# The rank's layout is built from the whole sequence's block index and handed to the op as an
# explicit layout, which the op's own index cache knows by identity: one tensor per pattern and
# length, reused across layers and steps, so neither is rebuilt on every call.
_RANK_SPECS = EagerCache(8)


def _rank_spec(plan: Plan, q_heads: int, device: torch.device):
    """The pattern of this rank's heads."""
    spec = plan.spec
    if not isinstance(spec, BlockSparseSpec):
        return spec
    if not spec.random_blocks and (spec.layout is None or spec.layout.shape[0] == 1):
        return spec  # every head keeps the same blocks
    h = q_heads // plan.world

    def build() -> BlockSparseSpec:
        layout = block_layout_tensor(spec, q_heads, plan.n, plan.is_causal, device)
        layout = layout[plan.rank * h:(plan.rank + 1) * h] if layout.shape[0] > 1 else layout
        return BlockSparseSpec(spec.block_size, local_blocks=None, layout=layout.contiguous())

    # The spec names an explicit layout by identity (the cache checks its version: in-place edits).
    key = (spec, q_heads, plan.n, plan.is_causal, device, plan.rank, plan.world)
    return _RANK_SPECS.get(key, spec.layout, build)


def _offsets_align(plan: Plan, q_heads: int) -> bool:
    """Whether the dilated op, handed this rank's heads, gives each the offsets of its index in
    the whole: one rank, or mixture with a multiple of every rate per rank (head ``h`` uses
    offset ``h mod r``)."""
    spec = plan.spec
    share = q_heads // plan.world
    return plan.world == 1 or spec.mode == "mixture" and share % math.lcm(*spec.dilation_rates) == 0


def all_to_all_attention(
    plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """This rank's attention rows. Shapes: q ``[B, Hq, n_r, D]``, k ``[B, Hkv, n_r, D]``, v
    ``[B, Hkv, n_r, Dv]`` -> ``[B, Hq, n_r, Dv]``."""
    q_heads, kv_heads, w = q.shape[1], k.shape[1], plan.world
    check_all_to_all(plan, q_heads)
    if kv_heads % w:
        # GQA with too few kv heads to split: repeat each the fewest times f (a divisor of the
        # group size) that makes them split; query head h still reads a copy of kv head h // g.
        group_size = q_heads // kv_heads
        f = next(f for f in range(1, group_size + 1) if group_size % f == 0 and kv_heads * f % w == 0)
        k, v = k.repeat_interleave(f, dim=1), v.repeat_interleave(f, dim=1)
        kv_heads *= f
    n, layout, rank = plan.n, plan.layout, plan.rank
    packed = [pack_ranges(x, n, w, layout, rank, 2) for x in (q, k, v)]  # [B, H, c_r, *]
    batch, length = q.shape[0], packed[0].shape[2]
    hq, hk = q_heads // w, kv_heads // w
    rows = []
    for j in range(w):  # row j goes to rank j: its heads of my positions
        rows.append(torch.cat([
            packed[0][:, j * hq:(j + 1) * hq].reshape(-1),
            packed[1][:, j * hk:(j + 1) * hk].reshape(-1),
            packed[2][:, j * hk:(j + 1) * hk].reshape(-1),
        ]))
    received = all_to_all_rows(torch.stack(rows), plan.group, w)  # row i: rank i's positions
    sizes = [batch * hq * length * q.shape[3], batch * hk * length * k.shape[3],
             batch * hk * length * v.shape[3]]
    shapes = [(batch, hq, length, q.shape[3]), (batch, hk, length, k.shape[3]),
              (batch, hk, length, v.shape[3])]
    parts = [list(torch.split(received[i], sizes)) for i in range(w)]
    full = [assemble([parts[i][t].view(shapes[t]) for i in range(w)], n, w, layout, 2) for t in range(3)]

    mask = None if attn_mask is None else _mask_of_rank_heads(attn_mask, plan, hq)
    if plan.kind == "dilated" and not _offsets_align(plan, q_heads):
        out = dilated_head_subset_attention(plan.spec, *full, plan.rank * hq, q_heads, plan.is_causal,
                                            plan.scale, mask)
    else:
        out, _ = pattern_attention(_rank_spec(plan, q_heads, q.device), *full, plan.is_causal, plan.scale,
                                   mask)
    # Back: rank i gets its positions of my heads.
    back = torch.stack([pack_ranges_of(out, plan, i).reshape(-1) for i in range(w)])
    returned = all_to_all_rows(back, plan.group, w)  # row j: my positions, rank j's heads
    dv = v.shape[3]
    heads = [returned[j].view(batch, hq, length, dv) for j in range(w)]
    return unpack_ranges(torch.cat(heads, dim=1), n, w, layout, rank, 2)


def _mask_of_rank_heads(mask: torch.Tensor, plan: Plan, hq: int) -> torch.Tensor:
    """This rank's rows of ``attn_mask`` (``[B or 1, Hq or 1, n_r or 1, N]``) -> every row of this
    rank's heads, ``[B or 1, hq or 1, N or 1, N]``. A mask the same for every row (key padding)
    needs no exchange; else one all-to-all moves each rank's rows of the receiver's heads (every
    head when the mask has one), bool masks as bytes."""
    per_head = mask.shape[1] != 1

    def heads_of(x: torch.Tensor, rank: int) -> torch.Tensor:
        return x[:, rank * hq:(rank + 1) * hq] if per_head else x

    if mask.shape[2] == 1:
        return heads_of(mask, plan.rank)
    w, n, layout, rank = plan.world, plan.n, plan.layout, plan.rank
    is_bool = mask.dtype == torch.bool
    packed = pack_ranges(mask.to(torch.uint8) if is_bool else mask, n, w, layout, rank, 2)
    received = all_to_all_rows(torch.stack([heads_of(packed, j).reshape(-1) for j in range(w)]),
                               plan.group, w)
    shape = (packed.shape[0], hq if per_head else 1, packed.shape[2], packed.shape[3])
    full = assemble([received[i].view(shape) for i in range(w)], n, w, layout, 2)
    return full.bool() if is_bool else full


def pack_ranges_of(full: torch.Tensor, plan: Plan, rank: int) -> torch.Tensor:
    """Rank ``rank``'s positions of the full sequence ``full`` (dim 2), packed as
    ``pack_ranges`` packs them."""
    pieces = [full[:, :, a:b] for a, b in plan.ranges(rank)]
    local = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return pack_ranges(local, plan.n, plan.world, plan.layout, rank, 2)
