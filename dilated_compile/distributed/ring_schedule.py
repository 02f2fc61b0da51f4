"""The ring's schedule for one call: which key/value rows each hop carries, which gradient rows
travel behind them, and the (query range, key range) pairs each step computes.

Rows of a rank are its local rows (its ranges back to back). ``need(r, s)``: the rows of rank
``s`` that rank ``r``'s queries attend at block granularity — a key row is needed when a query
block overlapping one of ``r``'s ranges keeps the row's key block (for some head; dense attention
keeps every block), pairs of ranges whose keys all follow the queries left out when causal. The
chunk of ``s`` reaches rank ``s + t`` at step ``t`` and carries only

    S_t(s) = union of need(s + u, s) for u = t .. W - 1        (S_0(s): every row of s),

so each hop drops the rows no rank still ahead needs (a pattern's empty blocks are never sent).
In the backward the chunk's gradient follows it, gathering the contributions of ranks
``s + 1 .. s + t`` on the rows

    G_t(s) = union of need(s + u, s) for u = 1 .. t,

and ``G_{W-1}(s)`` reaches ``s`` after the last step (``s``'s own contribution stays there).
Every rank computes the same sets from the plan, so each receive's size is known in advance.

A pair computes its query rows against its key rows in one call of the pattern's op: dense
attention on the held key rows (``DensePair``), or the block-sparse op on a virtual sequence of
whole blocks (``BlockPair``), which costs what the pair's kept blocks cost whatever the ranges'
alignment to the blocks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..ops import block_sparse_attention_backward_op, block_sparse_attention_op, dilated_attention_backward_op
from ..ops._block_layout import EagerCache
from .collectives import pad_dim
from .plan import Plan, block_layout_tensor, dense_attention

# (query row offset, query range, key row offset, key range, causal) of a pair of ranges.
PairRanges = tuple[int, tuple[int, int], int, tuple[int, int], bool]


def pair_ranges(plan: Plan, rank: int, source: int) -> list[PairRanges]:
    """``rank``'s query ranges against ``source``'s key ranges, with their local row offsets;
    empty pairs and (causal) pairs whose keys all follow the queries are left out. ``causal``:
    the causal mask cuts the pair, which happens only for a range against itself."""
    pairs, q_offset = [], 0
    for qa, qb in plan.ranges(rank):
        k_offset = 0
        for ka, kb in plan.ranges(source):
            if qa < qb and ka < kb and not (plan.is_causal and ka >= qb):
                causal = plan.is_causal and kb - 1 > qa
                if causal and (qa, qb) != (ka, kb):
                    raise AssertionError("ring: layouts give equal or disjoint ranges")
                pairs.append((q_offset, (qa, qb), k_offset, (ka, kb), causal))
            k_offset += kb - ka
        q_offset += qb - qa
    return pairs


def _blocks(a: int, b: int, block_size: int) -> slice:
    """The blocks overlapping positions ``[a, b)`` (non-empty)."""
    return slice(a // block_size, (b - 1) // block_size + 1)


def _pair_key_blocks(kept: torch.Tensor | None, block_size: int, qa: int, qb: int, ka: int,
                     kb: int) -> torch.Tensor | None:
    """Bool over the blocks overlapping ``[ka, kb)``: kept by a query block overlapping
    ``[qa, qb)``. None for dense attention (every block)."""
    if kept is None:
        return None
    return kept[_blocks(qa, qb, block_size), _blocks(ka, kb, block_size)].any(0)


def _needs(plan: Plan, kept: torch.Tensor | None, block_size: int) -> list[list[torch.Tensor]]:
    """``needs[r][s]``: bool over ``s``'s local rows, ``need(r, s)`` (module docstring)."""
    needs = []
    for rank in range(plan.world):
        row = []
        for source in range(plan.world):
            need = torch.zeros(sum(b - a for a, b in plan.ranges(source)), dtype=torch.bool)
            for _, (qa, qb), k_offset, (ka, kb), _ in pair_ranges(plan, rank, source):
                blocks = _pair_key_blocks(kept, block_size, qa, qb, ka, kb)
                rows = need[k_offset:k_offset + kb - ka]
                if blocks is None:
                    rows.fill_(True)
                else:
                    rows |= blocks[torch.arange(ka, kb) // block_size - ka // block_size]
            row.append(need)
        needs.append(row)
    return needs


def _union(sets: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for s in sets:
        out |= s
    return out


def _index_in(subset: torch.Tensor, superset: torch.Tensor) -> torch.Tensor | None:
    """The positions in ``superset``'s rows of ``subset``'s rows (both bool over the same local
    rows, ``subset`` within ``superset``); None when they are the same rows."""
    if torch.equal(subset, superset):
        return None
    return (superset.cumsum(0) - 1)[subset]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the ring on this rank.

    Attributes:
        pairs: the pairs computed against the chunk held (of rank ``source``).
        send: the rows of the held chunk passed on (indices into it; None: all of them).
        receive_rows: rows of the chunk received for the next step (0 on the last step).
        acc_rows: rows of this step's gradient accumulator (step 0: the rank's own rows).
        carry: the rows of the received accumulator in this step's (None: the same rows).
        acc_receive_rows: rows of the accumulator received after this step (step 0: none).
    """

    source: int
    pairs: tuple
    send: torch.Tensor | None
    receive_rows: int
    acc_rows: int
    carry: torch.Tensor | None
    acc_receive_rows: int


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The ring's steps on this rank and, after the last, where the received accumulator's rows
    go among the rank's own rows (``own``; None: all of them)."""

    steps: tuple[Step, ...]
    own: torch.Tensor | None


def _mask_block(mask, rows: slice, keys: tuple[int, int]):
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    return mask[..., keys[0]:keys[1]]


def _pad_keys(q, k, v, mask):
    """The op takes no more queries than keys; a block shorter than the query rows (an uneven
    split, in a pair the causal mask does not cut) gets zero keys that the mask removes."""
    rows, keys = q.shape[2], k.shape[2]
    if rows <= keys:
        return k, v, mask
    pad = rows - keys
    k, v = pad_dim(k, 2, rows), pad_dim(v, 2, rows)
    if mask is None:
        mask = torch.arange(rows, device=q.device).view(1, 1, 1, rows) < keys
    else:
        fill = False if mask.dtype == torch.bool else float("-inf")
        mask = torch.cat([mask, mask.new_full((*mask.shape[:-1], pad), fill)], dim=-1)
    return k, v, mask


@dataclasses.dataclass(frozen=True)
class DensePair:
    """Dense attention of the query rows ``rows`` to the key rows ``held`` of the held chunk
    (``acc``: the same rows in the gradient accumulator; ``keys``: their global range, the
    mask's columns). ``kv`` is the held chunk ``[B, Hkv, rows, D + Dv]``."""

    rows: slice
    held: slice
    acc: slice
    keys: tuple[int, int]
    causal: bool

    def _inputs(self, q, kv, d, mask):
        return _pad_keys(q[:, :, self.rows], kv[:, :, self.held, :d], kv[:, :, self.held, d:],
                         _mask_block(mask, self.rows, self.keys))

    def forward(self, plan: Plan, q, kv, d, mask):
        """(out, lse) of the rows: ``[B, Hq, rows, Dv]``, ``[B, Hq, rows]``."""
        k, v, m = self._inputs(q, kv, d, mask)
        return dense_attention(q[:, :, self.rows], k, v, self.causal, plan.scale, m)

    def backward(self, plan: Plan, grad_out, q, kv, d, out, lse, mask, dq, acc) -> None:
        """Add the pair's gradients, from the merged ``out`` and ``lse``, to ``dq`` and ``acc``."""
        k, v, m = self._inputs(q, kv, d, mask)
        r = self.rows
        dq_c, dk_c, dv_c = dilated_attention_backward_op(
            grad_out[:, :, r], q[:, :, r], k, v, out[:, :, r], lse[:, :, r], None, [k.shape[2]],
            [1], "mixture", self.causal, plan.scale, m)
        length = self.keys[1] - self.keys[0]
        dq[:, :, r] += dq_c.to(dq.dtype)
        acc[:, :, self.acc, :d] += dk_c[:, :, :length].to(acc.dtype)
        acc[:, :, self.acc, d:] += dv_c[:, :, :length].to(acc.dtype)


@dataclasses.dataclass(frozen=True)
class BlockPair:
    """Block-sparse attention of the query rows ``rows`` to the kept blocks of one key range, as
    one call of the block-sparse op (explicit layout) on a virtual sequence of ``M`` whole blocks.

    The op's queries are the last positions of its keys, so the virtual sequence holds the key
    range's kept blocks (``J``, in order, each at its own offset within the block) in its first
    blocks and the query range's blocks (``I``) in its last ``|I|`` blocks; ``M = max(|J|, |I|)``
    and the virtual layout keeps ``(I, J)`` as the sequence's layout does. Slots of positions
    outside the ranges hold zeros: a key mask removes the keys, the queries' results are dropped
    (and, zero queries with a zero output gradient, give no gradient). A range against itself
    uses ``J = I`` (keys and queries in the same blocks), where the op's causal mask applies.
    The cost is the pair's kept blocks; memory: the layout ``[H', M, M]``, the gathered keys and,
    with ``attn_mask``, its entries ``[.., |I| * bs, M * bs]``.

    Attributes:
        rows: this rank's query rows; ``lead``: the virtual query slot of the first one.
        query_slots, key_slots: ``|I| * bs`` and ``M * bs``.
        slots: ``[k]`` int64, the key slots holding keys; ``held``, ``acc``: ``[k]``, their rows in
            the held chunk and in the gradient accumulator.
        columns: ``[M * bs]`` int64, each key slot's global position (any in-range one for empty
            slots), the mask's columns; ``mask_rows``: ``[|I| * bs]``, each query slot's local row.
        key_mask: ``[M * bs]`` bool, the slots holding keys; None when all do.
        layout: ``[H', M, M]`` bool; ``causal``: the op's ``is_causal``.
    """

    rows: slice
    lead: int
    query_slots: int
    key_slots: int
    slots: torch.Tensor
    held: torch.Tensor
    acc: torch.Tensor
    columns: torch.Tensor
    mask_rows: torch.Tensor
    key_mask: torch.Tensor | None
    layout: torch.Tensor
    block_size: int
    causal: bool

    def _rows(self, x, value=0.0):
        """This pair's rows of ``x`` (dim 2) on the virtual query slots."""
        x = x[:, :, self.rows]
        trail = self.query_slots - self.lead - x.shape[2]
        pad = (self.lead, trail) if x.dim() == 3 else (0, 0, self.lead, trail)
        return F.pad(x, pad, value=value)

    def _keys(self, kv, d):
        """The virtual keys and values from the held chunk: ``[B, Hkv, M * bs, D]``, ``Dv``."""
        keys = kv.new_zeros(*kv.shape[:2], self.key_slots, kv.shape[3])
        keys.index_copy_(2, self.slots, kv.index_select(2, self.held))
        return keys[..., :d], keys[..., d:]

    def _mask(self, mask):
        if mask is None:
            return None if self.key_mask is None else self.key_mask.view(1, 1, 1, -1)
        if mask.shape[-2] != 1:
            mask = mask.index_select(-2, self.mask_rows)
        mask = mask.index_select(-1, self.columns)
        if self.key_mask is None:
            return mask
        if mask.dtype == torch.bool:
            return mask & self.key_mask
        return mask.masked_fill(~self.key_mask, float("-inf"))

    def _pattern(self):
        return (self.block_size, None, 0, 0, 0, self.layout, self.causal)

    def forward(self, plan: Plan, q, kv, d, mask):
        """(out, lse) of the rows: ``[B, Hq, rows, Dv]``, ``[B, Hq, rows]``."""
        k, v = self._keys(kv, d)
        out, lse = block_sparse_attention_op(self._rows(q), k, v, *self._pattern(), plan.scale,
                                             self._mask(mask))
        end = self.lead + self.rows.stop - self.rows.start
        return out[:, :, self.lead:end], lse[:, :, self.lead:end]

    def backward(self, plan: Plan, grad_out, q, kv, d, out, lse, mask, dq, acc) -> None:
        """Add the pair's gradients, from the merged ``out`` and ``lse``, to ``dq`` and ``acc``."""
        k, v = self._keys(kv, d)
        dq_c, dk_c, dv_c = block_sparse_attention_backward_op(
            self._rows(grad_out), self._rows(q), k, v, self._rows(out), self._rows(lse), None,
            *self._pattern(), plan.scale, self._mask(mask))
        end = self.lead + self.rows.stop - self.rows.start
        dq[:, :, self.rows] += dq_c[:, :, self.lead:end].to(dq.dtype)
        dkv = torch.cat([dk_c, dv_c], dim=-1).index_select(2, self.slots)
        acc.index_add_(2, self.acc, dkv.to(acc.dtype))


def _dense_pair(ranges: PairRanges, held: torch.Tensor, acc: torch.Tensor) -> DensePair:
    q_offset, (qa, qb), k_offset, (ka, kb), causal = ranges
    start, acc_start = int(held[:k_offset].sum()), int(acc[:k_offset].sum())
    return DensePair(slice(q_offset, q_offset + qb - qa), slice(start, start + kb - ka),
                     slice(acc_start, acc_start + kb - ka), (ka, kb), causal)


def _block_pair(plan: Plan, ranges: PairRanges, layout: torch.Tensor, kept: torch.Tensor,
                held: torch.Tensor, acc: torch.Tensor, same_range: bool) -> BlockPair | None:
    """The pair's ``BlockPair`` (None when it keeps no block); ``held``/``acc``: bool over the
    source's rows, the held chunk's and the accumulator's rows."""
    bs = plan.spec.block_size
    q_offset, (qa, qb), k_offset, (ka, kb), causal = ranges
    query_blocks = _blocks(qa, qb, bs)
    first, count = query_blocks.start, query_blocks.stop - query_blocks.start
    if same_range:
        key_blocks = torch.arange(first, query_blocks.stop)
    else:
        key_blocks = _blocks(ka, kb, bs).start + _pair_key_blocks(kept, bs, qa, qb, ka, kb).nonzero()[:, 0]
    if not kept[query_blocks][:, key_blocks].any():
        return None
    m = max(len(key_blocks), count)
    positions = (key_blocks.view(-1, 1) * bs + torch.arange(bs)).flatten()
    inside = (positions >= ka) & (positions < kb)
    local = k_offset + positions[inside] - ka  # the source's local rows of the keys
    key_mask = pad_dim(inside, 0, m * bs)
    columns = pad_dim(positions.clamp(ka, kb - 1), 0, m * bs)
    query_positions = first * bs + torch.arange(count * bs)
    mask_rows = q_offset + query_positions.clamp(qa, qb - 1) - qa
    virtual = torch.zeros(layout.shape[0], m, m, dtype=torch.bool, device=layout.device)
    blocks = layout[:, query_blocks].index_select(2, key_blocks.to(layout.device))
    virtual[:, m - count:, :len(key_blocks)] = blocks
    device = layout.device
    return BlockPair(
        rows=slice(q_offset, q_offset + qb - qa), lead=qa - first * bs, query_slots=count * bs,
        key_slots=m * bs, slots=inside.nonzero()[:, 0].to(device),
        held=(held.cumsum(0) - 1)[local].to(device), acc=(acc.cumsum(0) - 1)[local].to(device),
        columns=columns.to(device), mask_rows=mask_rows.to(device),
        key_mask=None if bool(key_mask.all()) else key_mask.to(device), layout=virtual,
        block_size=bs, causal=causal,
    )


def build_schedule(plan: Plan, q_heads: int, device: torch.device) -> Schedule:
    """This rank's ring for ``plan`` (dense or block-sparse, ``q_heads`` query heads)."""
    layout = kept = None
    block_size = 1
    if plan.kind == "block_sparse":
        layout = block_layout_tensor(plan.spec, q_heads, plan.n, plan.is_causal, device)
        kept = layout.any(0).cpu()
        block_size = plan.spec.block_size
    needs = _needs(plan, kept, block_size)
    w, r = plan.world, plan.rank

    def carried(t: int, s: int) -> torch.Tensor:  # S_t(s)
        if t == 0:
            return torch.ones_like(needs[s][s])
        return _union([needs[(s + u) % w][s] for u in range(t, w)], needs[s][s])

    def gathered(t: int, s: int) -> torch.Tensor:  # G_t(s)
        return _union([needs[(s + u) % w][s] for u in range(1, t + 1)], needs[s][s])

    steps = []
    for t in range(w):
        s = (r - t) % w
        held = carried(t, s)
        acc = held if t == 0 else gathered(t, s)
        pairs = []
        for ranges in pair_ranges(plan, r, s):
            if layout is None:
                pairs.append(_dense_pair(ranges, held, acc))
                continue
            same = s == r and ranges[1] == ranges[3]
            pair = _block_pair(plan, ranges, layout, kept, held, acc, same)
            if pair is not None:
                pairs.append(pair)
        last = t == w - 1
        steps.append(Step(
            source=s, pairs=tuple(pairs),
            send=None if last else _to(_index_in(carried(t + 1, s), held), device),
            receive_rows=0 if last else int(carried(t + 1, (s - 1) % w).sum()),
            acc_rows=int(acc.sum()),
            carry=_to(_index_in(gathered(t - 1, s), acc), device) if t >= 2 else None,
            acc_receive_rows=int(gathered(t, (s - 1) % w).sum()) if t >= 1 else 0,
        ))
    own = _to(_index_in(gathered(w - 1, r), torch.ones_like(needs[r][r])), device) if w > 1 else None
    return Schedule(tuple(steps), own)


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


# A schedule is one per pattern, length and rank, reused across layers and steps: building it
# reads the whole sequence's block layout on the host, and its per-pair layouts, the same
# tensors on every call, let the op's block-index cache hit.
_SCHEDULES = EagerCache(8)


def schedule(plan: Plan, q_heads: int, device: torch.device) -> Schedule:
    """``build_schedule``, cached per pattern (an explicit layout by identity and version),
    length, heads, causality, layout, rank and device."""
    spec = plan.spec
    explicit = getattr(spec, "layout", None)
    key = (spec, q_heads if plan.kind == "block_sparse" else None, plan.n, plan.is_causal,
           plan.layout, plan.rank, plan.world, device)
    return _SCHEDULES.get(key, explicit, lambda: build_schedule(plan, q_heads, device))
