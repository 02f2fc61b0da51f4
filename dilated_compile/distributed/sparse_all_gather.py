"""The ``"all_gather"`` strategy for dilated attention: LongNet's sparse all-gather.

A rank's query rows attend, under config ``i = (w_i, r_i)`` (``w'_i = min(w_i, N)``), only keys
of the segments they lie in, and of those only the rows whose local index has the head's
offset. So each rank receives exactly those key/value rows, and no others:

- **Lanes.** For a config, an offset ``o`` and one of the rank's ranges ``[qa, qb)``, the
  rank's query rows with local index ``j = p mod w'`` where ``j mod r == o`` attend the rows of
  their segments with the same residue (causal: up to themselves). Taken in order, those rows
  form a compressed sequence whose segments (one per segment of the sequence) all hold
  ``ceil((w' - o) / r)`` rows but the sequence's last, which may hold fewer: the dilated op with
  one segment of that length and rate 1 (order, hence causality, is kept) computes the lane's
  rows exactly. The window runs from the start of the segment of the lane's first query row to
  its last query row (causal) or to the end of its segment; non-causal queries are padded with
  zero rows to the window's end (the op's queries are its keys' last positions), dropped after.
- **Aligned configs.** When ``qa`` is a multiple of ``w'_i`` and (non-causal) ``qb`` is one too
  or ``N``, every segment the range touches lies inside it: those configs (``mode="mixture"``;
  ``"head_groups"`` when every config is aligned) run as the dilated op on the range's own rows
  with their original lengths, with no lane and no key from another rank.
- **Merge.** Per row the partial results (the aligned configs' op, each other config's lanes)
  merge by their log-sum-exp, as DESIGN's ``c[p, t]`` weighting prescribes: ``out = sum_i
  softmax_i(lse) out_i``. A row no result reaches gives 0 (its ``lse`` are replaced by 0 so the
  weights stay finite and its outputs are 0). Gradients flow through the outputs and the lse
  (the op's backward takes ``grad_lse``).
- **Exchange.** Which rows rank ``j`` needs from rank ``s`` is a function of ``(N, W, layout,
  spec, Hq, Hkv, causal)`` alone, so every rank computes every other rank's requests without
  communicating. One ``all_to_all_single_autograd`` with uneven splits moves them (rows flattened
  over ``(kv head, position)``, K and V side by side, each source's rows sorted by ``kv head * N +
  position``); its backward is the reverse all-to-all, which returns the gradients of the
  received rows to their owners. When no rank needs a row of another, no collective runs at all
  (world size 1 always). The plan (index tensors) is cached per ``(N, W, layout, rank, spec,
  heads, causal, device)``.

Per-rank traffic (bytes received in the forward; the backward's reverse all-to-all moves the
same back): ``B * (D + Dv) * s * sum_h |K_h|`` over the kv heads ``h``, where ``K_h`` is the set
of positions on other ranks that some query head of kv head ``h`` attends from one of this rank's
positions under some config (masks aside: ``count_matrix`` > 0). For each of the rank's ``R``
ranges (1 contiguous, 2 zigzag) and config ``i`` those lie before the range's first row of the
lane, in its segment, and (non-causal) after its last, in its segment: at most ``floor((w'_i -
1) / r_i)`` per side and offset, so

    |K_h| <= R * (2, causal: 1) * sum_i m_hi * floor((w'_i - 1) / r_i)

with ``m_hi`` the offsets the query heads of kv head ``h`` use under config ``i`` (mixture: at
most ``min(Hq / Hkv, r_i)``; head_groups: at most 1): for fixed configs, bounded independently
of ``N`` and ``W``. A config adds nothing for a range whose start (and, non-causal, end) is a
multiple of ``w'_i`` (or ``N``): configs whose segments tile the ranks' shards move nothing.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops import dilated_attention_op
from ..ops._block_layout import EagerCache
from ..ops._numerics import lse_dtype
from ..ops._pattern import HeadPart, head_parts
from ..spec import DilatedSpec
from .collectives import all_to_all, count_received, pad_dim
from .layout import chunk_ranges, global_order, local_length
from .merge import merge_by_lse
from .plan import Plan, connected_zero


@dataclasses.dataclass(frozen=True)
class _Lane:
    """One op call: this rank's query rows of one (config, offset) in one of its ranges.

    ``config`` the config's index; ``heads`` ``[Hq']`` query heads; ``kv_heads`` ``[Hkv']``
    the op's key/value heads (``Hq' % Hkv' == 0``, GQA); ``rows`` ``[Lq]`` local query rows, in
    position order; ``keys`` ``[Hkv' * Lk]`` rows of the key table (kv head-major); ``columns``
    ``[Lk]`` the keys' global positions (the mask's columns); ``segment`` the compressed segment
    length; ``pad`` zero query rows after the real ones."""

    config: int
    heads: torch.Tensor
    kv_heads: torch.Tensor
    rows: torch.Tensor
    keys: torch.Tensor
    columns: torch.Tensor
    segment: int
    pad: int


@dataclasses.dataclass(frozen=True)
class _Range:
    """One of this rank's ranges: ``length`` local rows from ``start``, global ``[qa, qa +
    length)``. ``direct``: the (segment_lengths, dilation_rates) the op computes on the range's
    own rows, or None; ``lanes`` the other configs'; ``slots`` partial results per row (the
    direct one first); ``targets`` ``[sum Hq' * Lq]``: the lanes' rows in ``[slots * Hq *
    length]``."""

    start: int
    qa: int
    length: int
    direct: tuple[tuple[int, ...], tuple[int, ...]] | None
    lanes: tuple[_Lane, ...]
    slots: int
    targets: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class _SparsePlan:
    """This rank's ranges, and its part of the exchange: ``send`` the local key-table rows it
    sends, grouped by destination (``send_sizes``), ``receive_sizes`` the rows from each rank;
    ``exchange`` whether any rank receives a row (else no collective runs)."""

    ranges: tuple[_Range, ...]
    send: torch.Tensor
    send_sizes: list[int]
    receive_sizes: list[int]
    exchange: bool


# -- positions of a lane (pure functions of ints) -------------------------------------------------

def _first_at_or_after(p: int, w: int, r: int, o: int, n: int) -> int | None:
    """The first position ``>= p`` whose local index ``j`` (segments of ``w``) has ``j mod r ==
    o``, or None when there is none before ``n``."""
    if o >= w:
        return None
    s, j = divmod(p, w)
    j = o if j <= o else o + -(-(j - o) // r) * r
    if j >= w:
        s, j = s + 1, o
    position = s * w + j
    return position if position < n else None


def _last_before(p: int, w: int, r: int, o: int) -> int | None:
    """The last position ``< p`` of the lane (as ``_first_at_or_after``), or None."""
    if o >= w or p <= 0:
        return None
    s, j = divmod(p - 1, w)
    if j < o:
        s, j = s - 1, w - 1
    return None if s < 0 else s * w + o + (j - o) // r * r


def _lane_positions(a: int, b: int, w: int, r: int, o: int, n: int) -> torch.Tensor:
    """The lane's positions in ``[a, b)``, ascending (int64, CPU)."""
    first = _first_at_or_after(a, w, r, o, n)
    if first is None or first >= b:
        return torch.empty(0, dtype=torch.int64)
    segments = torch.arange(first // w, (b - 1) // w + 1)
    steps = torch.arange(-(-(w - o) // r)) * r + o
    positions = (segments.view(-1, 1) * w + steps.view(1, -1)).flatten()
    return positions[(positions >= a) & (positions < b)]


@dataclasses.dataclass(frozen=True)
class _Call:
    """What the exchange plan depends on: the same on every rank (``Hq``, ``Hkv`` the heads)."""

    spec: DilatedSpec
    n: int
    world: int
    layout: str
    q_heads: int
    kv_heads: int
    causal: bool

    def ranges(self, rank: int) -> list[tuple[int, int]]:
        return chunk_ranges(self.n, self.world, self.layout, rank)

    def lane(self, part: HeadPart) -> tuple[int, int, int]:
        """``(w', r, o)`` of a head part: its capped segment length, rate and offset."""
        return min(part.segment_length, self.n), part.dilation_rate, part.offset

    def direct_configs(self, qa: int, qb: int) -> list[int]:
        """The configs the op computes on the rows ``[qa, qb)`` alone: those whose segments
        that the rows attend lie inside them (mixture); all or none for head_groups (a subset of
        the configs would regroup the heads)."""
        n = self.n
        aligned = [i for i, w in enumerate(self.spec.segment_lengths)
                   if qa % min(w, n) == 0 and (self.causal or qb % min(w, n) == 0 or qb == n)]
        if self.spec.mode == "head_groups" and len(aligned) < self.spec.num_configs:
            return []
        return aligned


@dataclasses.dataclass(frozen=True)
class _Window:
    """A lane of one rank's range: its query rows lie in ``[first, last]``, its keys in
    ``[start, end)``; ``heads`` the query heads, ``op_kv`` the op's kv heads and ``kv`` the
    distinct ones (CPU)."""

    range_index: int
    part: HeadPart
    first: int
    last: int
    start: int
    end: int
    heads: torch.Tensor
    op_kv: torch.Tensor
    kv: torch.Tensor


def kv_heads_of(heads: torch.Tensor, q_heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's kv heads for the query heads ``heads`` (each repeated for its consecutive query
    heads when they form equal GQA groups, else one per query head), and the distinct ones."""
    per_query = heads // (q_heads // kv_heads)
    distinct = torch.unique_consecutive(per_query)
    group = per_query.numel() // distinct.numel()
    regular = per_query.numel() % distinct.numel() == 0
    if regular and torch.equal(distinct.repeat_interleave(group), per_query):
        return distinct, torch.unique(per_query)
    return per_query, torch.unique(per_query)


def _windows(call: _Call, rank: int) -> list[_Window]:
    """The lanes of ``rank``'s ranges, for the configs not computed directly."""
    parts = head_parts(call.spec.segment_lengths, call.spec.dilation_rates, call.spec.mode, call.q_heads)
    heads = [torch.arange(call.q_heads)[part.heads] for part in parts]
    kv = [kv_heads_of(h, call.q_heads, call.kv_heads) for h in heads]
    windows = []
    for index, (qa, qb) in enumerate(call.ranges(rank)):
        if qa == qb:
            continue
        direct = call.direct_configs(qa, qb)
        for part, part_heads, (op_kv, distinct) in zip(parts, heads, kv):
            if part.config_index in direct:
                continue
            w, r, o = call.lane(part)
            first = _first_at_or_after(qa, w, r, o, call.n)
            if first is None or first >= qb:
                continue
            last = _last_before(qb, w, r, o)
            start = first // w * w
            end = last + 1 if call.causal else min((last // w + 1) * w, call.n)
            windows.append(_Window(index, part, first, last, start, end, part_heads, op_kv, distinct))
    return windows


def _owners(call: _Call, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank holding each global position, and its row in that rank's local tensor."""
    starts, ranks, shifts = [], [], []
    for rank, index in global_order(call.world, call.layout):
        ranges = call.ranges(rank)
        before = sum(b - a for a, b in ranges[:index])
        starts.append(ranges[index][0])
        ranks.append(rank)
        shifts.append(before - ranges[index][0])
    chunk = torch.searchsorted(torch.tensor(starts), positions, right=True) - 1
    return torch.tensor(ranks)[chunk], positions + torch.tensor(shifts)[chunk]


def _outside(a: int, b: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[a, b)`` without ``ranges``, as intervals."""
    pieces = [(a, b)]
    for ra, rb in ranges:
        pieces = [p for x, y in pieces for p in ((x, min(y, ra)), (max(x, rb), y)) if p[0] < p[1]]
    return pieces


def _needs_remote(call: _Call, rank: int, windows: list[_Window]) -> bool:
    """Whether ``rank`` (whose lanes are ``windows``) needs a key row another rank holds."""
    for window in windows:
        w, r, o = call.lane(window.part)
        for a, b in _outside(window.start, window.end, call.ranges(rank)):
            first = _first_at_or_after(a, w, r, o, call.n)
            if first is not None and first < b:
                return True
    return False


# -- the plan -------------------------------------------------------------------------------------

def _segment(part: HeadPart, n: int) -> int:
    """Rows of the lane in a full segment: local indices ``o, o + r, ... < w'``."""
    return -(-(min(part.segment_length, n) - part.offset) // part.dilation_rate)


def _lanes(call: _Call, rank: int, windows: list[_Window],
           device: torch.device) -> tuple[list[list[_Lane]], list[int]]:
    """``rank``'s lanes, per range, and how many key rows it receives from each rank (sorted by
    source rank, then by code ``kv * n + position``, in the key table after its own rows)."""
    n, ranges = call.n, call.ranges(rank)
    mine = local_length(n, call.world, call.layout, rank)
    span = call.kv_heads * n  # source * span + code orders the received rows
    drafts, wanted = [], []
    for window in windows:
        keys = _lane_positions(window.start, window.end, *call.lane(window.part), n)
        owner, local = _owners(call, keys)
        remote = owner != rank
        wanted.append((owner[remote] * span + window.kv.view(-1, 1) * n + keys[remote]).flatten())
        drafts.append((window, keys, owner, local))
    received = torch.unique(torch.cat(wanted)) if wanted else torch.empty(0, dtype=torch.int64)

    lanes: list[list[_Lane]] = [[] for _ in ranges]
    for window, keys, owner, local in drafts:
        qa = ranges[window.range_index][0]
        start = sum(b - a for a, b in ranges[:window.range_index])
        before = int((keys < window.first).sum())
        count = int((keys <= window.last).sum()) - before  # the lane's query rows
        op_kv = window.op_kv.view(-1, 1)
        sent = torch.searchsorted(received, owner * span + op_kv * n + keys)
        table = torch.where(owner == rank, op_kv * mine + local, call.kv_heads * mine + sent)
        rows = keys[before:before + count] - qa + start
        lanes[window.range_index].append(_Lane(
            window.part.config_index, window.heads.to(device), window.op_kv.to(device),
            rows.to(device), table.flatten().to(device), keys.to(device), _segment(window.part, n),
            keys.numel() - before - count,
        ))
    return lanes, torch.bincount(received // span, minlength=call.world).tolist()


def _sends(call: _Call, rank: int, windows: list[list[_Window]]) -> tuple[torch.Tensor, list[int]]:
    """The local key-table rows ``rank`` sends, grouped by destination (each group sorted by
    code ``kv * n + position``, the order the destination receives them in), and the group
    sizes: the rows it holds of the other ranks' lane windows (``windows[j]``: rank ``j``'s)."""
    n, ranges = call.n, call.ranges(rank)
    mine = local_length(n, call.world, call.layout, rank)
    rows, sizes = [], []
    for j in range(call.world):
        codes = [torch.empty(0, dtype=torch.int64)]
        for window in windows[j] if j != rank else ():
            for a, b in ranges:
                lo, hi = max(a, window.start), min(b, window.end)
                if lo < hi:
                    positions = _lane_positions(lo, hi, *call.lane(window.part), n)
                    codes.append((window.kv.view(-1, 1) * n + positions).flatten())
        codes = torch.unique(torch.cat(codes))
        _, local = _owners(call, codes % n)
        rows.append(codes // n * mine + local)
        sizes.append(codes.numel())
    return torch.cat(rows), sizes


def _range(call: _Call, qa: int, qb: int, start: int, lanes: list[_Lane]) -> _Range:
    """One range's plan: the configs computed directly, the lanes and where their rows go."""
    spec = call.spec
    direct_configs = call.direct_configs(qa, qb)
    direct = None
    if direct_configs:
        direct = (tuple(spec.segment_lengths[i] for i in direct_configs),
                  tuple(spec.dilation_rates[i] for i in direct_configs))
    # Mixture: a slot per lane config, after the direct one; head_groups: every head has one config.
    lane_configs = [i for i in range(spec.num_configs) if i not in direct_configs]
    mixture = spec.mode == "mixture"
    slots = (direct is not None) + (len(lane_configs) if mixture else int(bool(lane_configs)))
    length = qb - qa
    targets = []
    for lane in lanes:
        slot = (direct is not None) + (lane_configs.index(lane.config) if mixture else 0)
        heads = slot * call.q_heads + lane.heads.view(-1, 1)
        targets.append((heads * length + lane.rows - start).flatten())
    return _Range(start, qa, length, direct, tuple(lanes), slots, torch.cat(targets) if targets else None)


def _build(call: _Call, rank: int, device: torch.device) -> _SparsePlan:
    windows = [_windows(call, j) for j in range(call.world)]
    lanes, receive_sizes = _lanes(call, rank, windows[rank], device)
    send, send_sizes = _sends(call, rank, windows)
    ranges, start = [], 0
    for (qa, qb), range_lanes in zip(call.ranges(rank), lanes):
        if qb > qa:
            ranges.append(_range(call, qa, qb, start, range_lanes))
        start += qb - qa
    # The same answer on every rank, so either all of them join the all-to-all or none does.
    exchange = any(_needs_remote(call, j, windows[j]) for j in range(call.world))
    return _SparsePlan(tuple(ranges), send.to(device), send_sizes, receive_sizes, exchange)


# Every layer of a model and every step of a training loop makes the same call: the plan is
# built once per pattern, length and rank (host-side index arithmetic, a few small tensor ops
# per lane and rank).
_PLANS = EagerCache(16)


def sparse_plan(plan: Plan, q_heads: int, kv_heads: int, device: torch.device) -> _SparsePlan:
    """This rank's lanes and exchange for ``plan`` (a dilated call), cached."""
    call = _Call(plan.spec, plan.n, plan.world, plan.layout, q_heads, kv_heads, plan.is_causal)
    return _PLANS.get((call, plan.rank, device), None, lambda: _build(call, plan.rank, device))


# -- the computation ------------------------------------------------------------------------------

def _exchange(kv_rows: torch.Tensor, sparse: _SparsePlan, plan: Plan) -> torch.Tensor:
    """The key/value rows this rank receives, ``[B, sum(receive_sizes), D + Dv]``, in the plan's
    order; differentiable (the backward returns their gradients to their owners)."""
    # The all-to-all splits dim 0: rows first.
    send = kv_rows.index_select(1, sparse.send).transpose(0, 1).contiguous()
    count_received("all_gather", sum(sparse.receive_sizes) * send.shape[1:].numel() * send.element_size())
    what = "sequence_parallel: the sparse all-gather of dilated keys and values (strategy 'all_gather')"
    received = all_to_all(send, sparse.receive_sizes, sparse.send_sizes, plan.group, what)
    return received.transpose(0, 1)


def _lane_mask(mask: torch.Tensor | None, lane: _Lane) -> torch.Tensor | None:
    """``mask`` (``[B|1, Hq|1, n_r|1, N]``) at the lane's heads, key columns and query rows, plus
    its ``pad`` rows, which keep every key (their outputs are dropped)."""
    if mask is None:
        return None
    if mask.shape[1] != 1:
        mask = mask.index_select(1, lane.heads)
    mask = mask.index_select(3, lane.columns)
    if mask.shape[2] != 1:
        mask = mask.index_select(2, lane.rows)
        if lane.pad:
            fill = True if mask.dtype == torch.bool else 0.0
            mask = torch.cat([mask, mask.new_full((*mask.shape[:2], lane.pad, mask.shape[3]), fill)], dim=2)
    return mask


def _lane_attention(plan: Plan, lane: _Lane, q: torch.Tensor, table: torch.Tensor, head_dim: int,
                    attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One lane's rows: out ``[B, Hq' * Lq, Dv]`` and lse ``[B, Hq' * Lq]``, head-major."""
    batch, count = q.shape[0], lane.rows.numel()
    queries = pad_dim(q.index_select(1, lane.heads).index_select(2, lane.rows), 2, count + lane.pad)
    kv = table.index_select(1, lane.keys).view(batch, lane.kv_heads.numel(), lane.columns.numel(), -1)
    out, lse = dilated_attention_op(queries, kv[..., :head_dim], kv[..., head_dim:], [lane.segment], [1],
                                    "mixture", plan.is_causal, plan.scale, _lane_mask(attn_mask, lane))
    return out[:, :, :count].flatten(1, 2), lse[:, :, :count].flatten(1, 2)


def _range_attention(plan: Plan, part: _Range, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     table: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of one of this rank's ranges, ``[B, Hq, length, Dv]``."""
    batch, q_heads, dv = q.shape[0], q.shape[1], v.shape[-1]
    if part.direct is None and not part.lanes:  # no row attends a key
        return q.new_zeros(batch, q_heads, part.length, dv)
    cdtype = lse_dtype(q.dtype)
    rows = q_heads * part.length
    outs, lses = q.new_zeros(batch, 0, dv, dtype=cdtype), q.new_zeros(batch, 0, dtype=cdtype)
    if part.direct is not None:
        local = [x.narrow(2, part.start, part.length) for x in (q, k, v)]
        mask = attn_mask
        if mask is not None:
            mask = mask if mask.shape[2] == 1 else mask.narrow(2, part.start, part.length)
            mask = mask.narrow(3, part.qa, part.length)
        out, lse = dilated_attention_op(*local, *part.direct, plan.spec.mode, plan.is_causal, plan.scale,
                                        mask)
        if not part.lanes:
            return out
        outs, lses = out.flatten(1, 2).to(cdtype), lse.flatten(1, 2).to(cdtype)
    results = [_lane_attention(plan, lane, q, table, k.shape[-1], attn_mask) for lane in part.lanes]
    # Slot s of head h, row i is at (s * Hq + h) * length + i along dim 1.
    missing = part.slots * rows - outs.shape[1]
    outs = torch.cat([outs, outs.new_zeros(batch, missing, dv)], dim=1)
    outs = outs.index_copy(1, part.targets, torch.cat([o for o, _ in results], dim=1).to(cdtype))
    if part.slots == 1:
        merged = outs
    else:
        lses = torch.cat([lses, lses.new_full((batch, missing), float("-inf"))], dim=1)
        lses = lses.index_copy(1, part.targets, torch.cat([s for _, s in results], dim=1).to(cdtype))
        merged = merge_by_lse(outs.view(batch, part.slots, rows, dv), lses.view(batch, part.slots, rows))
    return merged.view(batch, q_heads, part.length, dv).to(q.dtype)


def sparse_all_gather_attention(
    plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """This rank's rows of dilated attention (``plan.spec`` a ``DilatedSpec``). Shapes: q ``[B,
    Hq, n_r, D]``, k ``[B, Hkv, n_r, D]``, v ``[B, Hkv, n_r, Dv]``, attn_mask ``[B or 1, Hq or 1,
    n_r or 1, N]`` or None -> ``[B, Hq, n_r, Dv]``."""
    batch, q_heads, _, d = q.shape
    sparse = sparse_plan(plan, q_heads, k.shape[1], q.device)
    # The key table [B, rows, D + Dv]: rows (kv head, local position), then the received rows.
    kv_rows = torch.cat([k, v], dim=-1).flatten(1, 2)
    table = kv_rows
    if sparse.exchange:
        received = _exchange(kv_rows, sparse, plan)
        table = torch.cat([kv_rows, received], dim=1)
    outs = [_range_attention(plan, part, q, k, v, table, attn_mask) for part in sparse.ranges]
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    if not any(part.direct is not None or part.lanes for part in sparse.ranges):
        # No row attends a key (or the rank has no rows): zeros, still connected to the inputs so
        # that every shard gets a gradient.
        out = out + connected_zero(q, kv_rows)
    if sparse.exchange:
        # Every rank's backward must join the reverse all-to-all, also one whose rows use none of
        # what it received: it gets back the gradients of the rows it sent.
        out = out + connected_zero(received)
    return out
