"""Decompositions of the dilated-attention ops into standard aten ops.

For back-ends that cannot run the ``torch.ops.dilated_compile.*`` ops (ONNX, Torch-TensorRT, an
AOTInductor package that must load without this library), each op is rewritten into plain aten
ops that compute the same numbers (within dtype tolerance), gradients included:

    program = exported_program.run_decompositions(dilated_attention_decompositions())
    table = torch.export.default_decompositions()                 # or: core ATen and our ops
    table.update(dilated_attention_decompositions())
    program = exported_program.run_decompositions(table)

How it computes. For config ``(w, r)`` the sequence is padded to whole segments of ``w``
positions and viewed as ``[..., segments, rows, r, D]``, so the local indices ``o, o + r, ...`` of a
head's offset ``o`` are one index of the ``r`` axis (the segment is padded to ``rows * r``
positions first when ``r`` does not divide ``w``). Heads are grouped so that one slice per offset
picks every head's own rows at once (mixture: heads ``h = a * r + o``; head_groups: one offset per
group). Attention then runs densely inside each segment on those rows, with padded keys (and
future keys, when causal) masked, and configs are merged by log-sum-exp. Every tensor is
``O(N * w / r)`` per head (the largest are the scores, ``N * w / r^2``): no ``N x N`` tensor.

Only the number of segments depends on the sequence length, so one graph serves every length:
the decomposition works with a symbolic ``N`` (dynamic shapes in ``torch.export``, AOTInductor,
ONNX) and needs no guard on it. When ``N`` is a concrete int, segments are ``min(w, N)`` long, as
in the definition. When ``N`` is symbolic they are ``w`` long: for ``N < w`` the one segment
``[0, N)`` is padded to ``w`` positions, which gives the same pattern (every position lies in
segment 0 at local index ``p`` either way) at the cost of one full segment.
Traced from an example no longer than a segment, a config also carries one spare, fully padded
segment, so that the number of segments is never 1 in the example (see ``_spare_segments``).

Fewer queries than keys (``Nq <= Nk``; query ``i`` is position ``Nk - Nq + i``). When ``Nq == Nk``
is known when tracing, the layout above is used unchanged. Otherwise the rows cover only a window
of the segments that hold a query (``ceil(Nq / w) + 1`` of them with a symbolic ``N``, a bound
that needs no subtraction of sizes and is never 1), gathered with ``index_select``; and a few
queries known when tracing (decoding, ``Nq`` no larger than the rows of a segment) each gather the
key rows of their own segment, which costs ``O(Nq * w / r)``. In both cases k and v are cast and
expanded to the query heads only at the rows read, never whole.

``attn_mask`` (bool, True = keep, or float, added to the scores; broadcastable to
``[B, Hq, Nq, Nk]``) is read with one ``index_select`` of the flat mask per head block and
config, at the (query row, key row) pairs of each segment only; a broadcast (or stride-0) dim
stays of size 1, so a key-padding mask costs ``O(B * N)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.fx.experimental._config
from torch import Tensor

from ._checks import check_attn_mask, check_pattern
from .dilated_attention import dilated_attention_backward_op, dilated_attention_op

__all__ = [
    "dilated_attention_backward_decomposition",
    "dilated_attention_decomposition",
    "dilated_attention_decompositions",
]

_NEG_INF = float("-inf")


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    # Only when needed: a same-dtype .to() is an alias node in exported graphs.
    return x if x.dtype == dtype else x.to(dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # The ops' convention (docs/usage.md): float32 accumulation and lse, float64 for float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class _HeadBlock:
    """Query heads ``start + a * group + i`` (``a < repeats``, ``i < group``) attend under config
    ``(segment_length, rate)`` with offset ``first_offset + i``: one slice of the ``r`` axis per
    ``i`` picks the rows of all ``repeats`` heads that share that offset."""

    start: int
    repeats: int
    group: int
    first_offset: int
    segment_length: int
    rate: int

    @property
    def num_heads(self) -> int:
        return self.repeats * self.group


def _head_blocks(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, num_heads: int
) -> list[list[_HeadBlock]]:
    """The head blocks of each config, in head order (together they cover the config's heads)."""
    configs = list(zip(segment_lengths, dilation_rates))
    if mode == "mixture":
        # Head h has offset h mod r: the first (H // r) * r heads are r-periodic, the rest (fewer
        # than r heads) have offsets 0, 1, ... in order.
        blocks = []
        for w, r in configs:
            periodic = num_heads // r * r
            config_blocks = []
            if periodic:
                config_blocks.append(_HeadBlock(0, num_heads // r, r, 0, w, r))
            if num_heads - periodic:
                config_blocks.append(_HeadBlock(periodic, 1, num_heads - periodic, 0, w, r))
            blocks.append(config_blocks)
        return blocks
    # head_groups: G contiguous groups, the first H mod G one head larger; group g uses config g
    # with offset g mod r_g.
    base, larger = divmod(num_heads, len(configs))
    blocks, start = [], 0
    for g, (w, r) in enumerate(configs):
        size = base + (1 if g < larger else 0)
        blocks.append([_HeadBlock(start, size, 1, g % r, w, r)])
        start += size
    return blocks


def _spare_segments(seq_len, w: int) -> int:
    """1 when ``seq_len`` is symbolic and its example value (the hint) fits in one segment of
    ``w``, else 0: the number of extra, fully padded segments the layout carries.

    Compilers read sizes from the example input. With one segment there, the number of segments
    S has example value 1, and torch 2.11's Inductor, matching ``[S * w] -> [S, w]`` reshapes by
    example sizes, proves ``S * w == w`` by guarding S == 1. An AOTInductor package checks no
    such guard at run time, so it would be wrong (or read out of bounds) for longer sequences.
    A spare segment keeps S >= 2 for every length, so no size is ever 1; it costs one segment of
    padded work per config, paid only by graphs traced from an example that short."""
    if isinstance(seq_len, int):
        return 0
    hint = getattr(seq_len.node, "hint", None)
    return 1 if hint is None or hint <= w else 0


def _statically_equal(a, b) -> bool:
    """Whether two sizes are equal for every value they may take (no guard is added)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def _floor_multiple(x: Tensor, w: int) -> Tensor:
    """The largest multiple of ``w`` at most ``x`` (an integer tensor)."""
    return torch.div(x, w, rounding_mode="floor") * w


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


class _Mask:
    """``attn_mask`` as the decomposition reads it: flattened, with its 4-D sizes ``[Bm, Hm,
    Qm, Km]``, each 1 (broadcast) or the full size. A dim that was expanded (stride 0) counts as
    broadcast, so an expanded key-padding mask is never copied to its full size."""

    def __init__(self, attn_mask: Tensor):
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        for dim in range(4):
            stride = mask.stride(dim)
            if isinstance(stride, int) and stride == 0 and not _is_one(mask.shape[dim]):
                mask = mask.narrow(dim, 0, 1)
        self.sizes = tuple(mask.shape)
        self.flat = mask.reshape(-1)
        self.is_bool = mask.dtype == torch.bool


class _Layout:
    """Moves ``[B, H, N, F]`` tensors of one head block to its dilated rows
    ``[B, repeats, group, segments, rows, F]`` and back.

    Written so that a symbolic ``N`` needs no guard: no tensor's size is the number of segments
    alone (which may be 1), and no slice of a padded axis is reshaped (whether that is a view
    depends on the padding); ``index_select`` takes the rows that are kept instead.

    With as many queries as keys (``Nq == Nk``, known when tracing) the rows cover the whole
    sequence. With fewer (``Nq < Nk``, or not known to be equal) they cover only a window of
    whole segments from ``base``, the first segment that holds a query (query ``i`` is position
    ``Nk - Nq + i``): gathering and scattering go through an ``index_select`` of the window's
    positions, so a call with few queries costs a few segments whatever ``Nk`` is."""

    def __init__(self, block: _HeadBlock, q_len, kv_len, device: torch.device,
                 dtype: torch.dtype, q_heads: int):
        self.block = block
        self.dtype, self.q_heads = dtype, q_heads
        self.q_len, self.kv_len = q_len, kv_len
        self.seq_len = kv_len
        self.device = device
        # min(w, N) when N is known; with a symbolic N, w gives the same pattern (see module doc)
        # and keeps every shape but the number of segments static.
        w = block.segment_length
        self.w = min(w, kv_len) if isinstance(kv_len, int) else w
        self.r = block.rate
        self.rows = -(-self.w // self.r)  # ceil(w / r)
        self.same = _statically_equal(q_len, kv_len)
        self.base = self.shift = 0  # the window's first position; the position of query 0
        if self.same:
            self.spare = _spare_segments(kv_len, self.w)
            # ceil(N / w) + spare, as (N + (w - 1 + spare * w)) // w: no symbolic subtraction in
            # the graph.
            self.segments = (kv_len + (self.w - 1 + self.spare * self.w)) // self.w
        elif isinstance(q_len, int) and isinstance(kv_len, int):
            first = (kv_len - q_len) // self.w
            self.segments = -(-kv_len // self.w) - first
            self.base, self.shift = first * self.w, kv_len - q_len
        else:
            # The queries span at most ceil(Nq / w) + 1 segments: a bound with no subtraction of
            # sizes that is never 1 (positions past Nk are padding). Nk - Nq is computed on
            # tensors, where it is an ordinary subtraction.
            self.segments = (q_len + (2 * self.w - 1)) // self.w
            as_tensor = functools.partial(torch.scalar_tensor, dtype=torch.long, device=device)
            self.shift = as_tensor(kv_len) - as_tensor(q_len)
            self.base = _floor_multiple(self.shift, self.w)
        # Whether each row is a real position: [group, S, rows]. Row j of offset o in segment s
        # is position base + s * w + j * r + o; rows past w pad the segment to rows * r.
        # Computed directly, with no reshape of a symbolic size.
        first, group = block.first_offset, block.group
        local = torch.arange(self.rows, device=device) * self.r + (
            torch.arange(group, device=device) + first
        ).unsqueeze(-1)  # [group, rows], static
        starts = torch.arange(self.segments, device=device) * self.w  # [S]
        position = starts.unsqueeze(-1) + local.unsqueeze(1)  # [group, S, rows]
        if not self.same:
            position = position + self.base
        self.position = position
        self.valid = (local < self.w).unsqueeze(1) & (position < kv_len)

    def _rows(self, x: Tensor, lead: tuple) -> Tensor:
        """[*lead, S * w, F] -> [*lead[:-1], group, S, rows, F] (``lead`` ends with ``group``,
        the group axis being chosen per offset)."""
        features = x.shape[-1]
        x = x.reshape(*lead, self.segments, self.w, features)
        if self.rows * self.r != self.w:
            x = torch.nn.functional.pad(x, (0, 0, 0, self.rows * self.r - self.w))
        x = x.reshape(*lead, self.segments, self.rows, self.r, features)
        first, group = self.block.first_offset, self.block.group
        # One slice of the r axis per offset, stacked: a contiguous copy of N / r rows per head.
        picked = [x.select(len(lead) - 1, i)[..., first + i, :] for i in range(group)]
        return torch.stack(picked, dim=len(lead) - 1)

    def _window_rows(self, x: Tensor, query: bool) -> Tensor:
        """The window's S * w positions of ``x`` (the queries for ``query``, else the keys),
        zeros where a position is none of them. No copy of ``x`` itself (a long cache)."""
        position = torch.arange(self.segments * self.w, device=self.device) + self.base
        index = position - self.shift if query else position
        inside = position < self.kv_len
        if query:
            inside = inside & (index >= 0)
        x = x.index_select(2, torch.where(inside, index, 0))
        return torch.where(inside.unsqueeze(-1), x, 0.0)

    def gather(self, x: Tensor, query: bool = False) -> Tensor:
        """``x[:, block heads]`` ([B, H, L, F], the queries (L = Nq) or the keys (L = Nk)) at the
        block's rows: [B, repeats, group, S, rows, F], zeros where a row is no position of x.

        With a window (``Nq < Nk``) the keys may come in their own dtype and with their kv
        heads: they are cast and expanded to the query heads after the window is taken, so
        that a long cache is never copied whole."""
        b = self.block
        if not self.same:
            x = _expand_kv(_cast(self._window_rows(x, query), self.dtype), self.q_heads)
        if b.num_heads != x.shape[1]:  # (a slice of every head would be an alias node)
            x = x[:, b.start : b.start + b.num_heads]
        if self.same and isinstance(self.seq_len, int):  # zeros up to whole segments
            x = torch.nn.functional.pad(x, (0, 0, 0, self.segments * self.w - self.seq_len))
        elif self.same:
            # A static pad, then the first S * w rows by index_select: a slice there would make
            # later shapes depend on min(N + w - 1, S * w), and a pad by S * w - N would put a
            # subtraction of symbolic sizes in the graph (Torch-TensorRT converts none).
            x = torch.nn.functional.pad(x, (0, 0, 0, (1 + self.spare) * self.w - 1))
            x = x.index_select(2, torch.arange(self.segments * self.w, device=x.device))
        lead = (x.shape[0], b.repeats, b.group)
        return self._rows(x.reshape(*lead, self.segments * self.w, x.shape[-1]), lead)

    def scatter(self, y: Tensor, fill: float, query: bool = False) -> Tensor:
        """Inverse of ``gather``: [B, repeats, group, S, rows, F] -> [B, block heads, L, F] (L =
        Nq for ``query``, else Nk), with ``fill`` at the positions that are not the block's
        rows."""
        b = self.block
        batch, features = y.shape[0], y.shape[-1]
        mine = torch.arange(self.r, device=y.device) == (
            torch.arange(b.group, device=y.device) + b.first_offset
        ).unsqueeze(-1)  # [group, r]: the slot of the r axis that holds each row
        y = torch.where(mine.view(b.group, 1, 1, self.r, 1), y.unsqueeze(-2), fill)
        y = y.reshape(batch, b.num_heads, self.segments, self.rows * self.r, features)
        if self.rows * self.r != self.w:
            y = y.index_select(3, torch.arange(self.w, device=y.device))
        y = y.reshape(batch, b.num_heads, self.segments * self.w, features)
        if not self.same:
            if query:  # every query lies in the window
                index = torch.arange(self.q_len, device=y.device) + (self.shift - self.base)
                return y.index_select(2, index)
            # Keys before the window are attended by no query of this block: fill.
            y = torch.nn.functional.pad(y, (0, 0, 1, 0), value=fill)
            index = torch.arange(self.kv_len, device=y.device) - self.base
            return y.index_select(2, torch.where(index >= 0, index + 1, 0))
        if isinstance(self.seq_len, int):
            return y[:, :, : self.seq_len]
        return y.index_select(2, torch.arange(self.seq_len, device=y.device))

    def mask(self, is_causal: bool) -> Tensor:
        """Which key rows each query row sees: [group, S, rows, rows] (broadcasts over B, repeats)."""
        keys = self.valid.unsqueeze(-2)
        if not is_causal:
            return keys
        rows = torch.arange(self.rows, device=self.device)
        # Rows of one offset keep position order, so causal is row order within the segment.
        return keys & (rows.unsqueeze(-1) >= rows)

    def gather_mask(self, mask: _Mask) -> Tensor:
        """The entries of ``attn_mask`` at the block's (query row, key row) pairs of each
        segment: [Bm, repeats, group, S, rows, rows] with 1 for each broadcast dim (a key-padding
        mask gives [B, 1, group, S, 1, rows]). Only pairs within a segment are read, never a
        [Nq, Nk] block. Rows that are no position read entry 0; ``mask()`` drops them."""
        group, segments = self.block.group, self.segments
        key = torch.where(self.valid, self.position, 0).view(1, 1, group, segments, 1, self.rows)
        if self.same:
            query = torch.where(self.valid, self.position, 0)
        else:
            query = self.position - self.shift
            query = torch.where(self.valid & (query >= 0), query, 0)
        query = query.view(1, 1, group, segments, self.rows, 1)
        return _mask_entries(mask, self.block, query, key)


def _mask_entries(mask: _Mask, block: _HeadBlock, query: Tensor, key: Tensor) -> Tensor:
    """``attn_mask`` at the pairs (query index, key index) that broadcast from ``query`` and
    ``key`` (6-D integer tensors over [B, repeats, group, ...]), for the block's heads: one
    ``index_select`` of the flat mask. A broadcast dim of the mask contributes nothing, so the
    result keeps size 1 there."""
    batches, heads, queries, keys = mask.sizes
    index = torch.arange(1, device=key.device)  # 0, summed with what is not broadcast
    if not _is_one(keys):
        index = index + key
    if not _is_one(queries):
        index = index + query * keys
    if not _is_one(heads):
        head = torch.arange(block.repeats, device=key.device) * block.group + block.start
        head = head.unsqueeze(-1) + torch.arange(block.group, device=key.device)
        index = index + (head * (queries * keys)).view(1, block.repeats, block.group, 1, 1, 1)
    if not _is_one(batches):
        batch = torch.arange(batches, device=key.device) * (heads * queries * keys)
        index = index + batch.view(batches, 1, 1, 1, 1, 1)
    index = index.view([1] * 6) if index.dim() == 1 else index
    return mask.flat.index_select(0, index.reshape(-1)).view(index.shape)


class _QueryRowsLayout:
    """The layout for a few queries (``Nq`` a known int no larger than the rows of a segment,
    fewer than the keys; decoding with a KV cache): each query gathers the key rows of its own
    segment and offset, ``[B, repeats, group, Nq, rows, F]``, and is itself one row,
    ``[B, repeats, group, Nq, 1, F]``. The cost is ``O(Nq * w / r)`` per head and config, where
    the segment layout would attend whole segments. Same methods as ``_Layout``.

    A query whose offset is not the head's has no key there: ``mask()`` keeps nothing for it,
    so it gives out 0 and lse -inf under this config."""

    def __init__(self, block: _HeadBlock, q_len: int, kv_len, device: torch.device,
                 dtype: torch.dtype, q_heads: int):
        self.block, self.q_len, self.kv_len = block, q_len, kv_len
        self.device, self.dtype, self.q_heads = device, dtype, q_heads
        w = block.segment_length
        self.w = min(w, kv_len) if isinstance(kv_len, int) else w
        self.r = block.rate
        self.rows = -(-self.w // self.r)
        # Query i is position Nk - Nq + i (a tensor when Nk is symbolic: no size arithmetic).
        first_query = kv_len - q_len if isinstance(kv_len, int) else (
            torch.scalar_tensor(kv_len, dtype=torch.long, device=device) - q_len
        )
        self.query_position = torch.arange(q_len, device=device) + first_query  # [Nq]
        segment_start = _floor_multiple(self.query_position, self.w)
        query_local = self.query_position - segment_start
        local = torch.arange(self.rows, device=device) * self.r + (
            torch.arange(block.group, device=device) + block.first_offset
        ).unsqueeze(-1)  # [group, rows]
        # Key row j of group i for query q: position segment_start[q] + local[i, j].
        self.position = segment_start.unsqueeze(-1) + local.unsqueeze(1)  # [group, Nq, rows]
        # Whether the query is a row of each group's offset: [group, Nq, 1].
        on_offset = (query_local - _floor_multiple(query_local, self.r)).view(1, q_len, 1)
        on_offset = on_offset == local[:, :1].unsqueeze(1)
        self.valid = (local < self.w).unsqueeze(1) & (self.position < kv_len) & on_offset

    def gather(self, x: Tensor, query: bool = False) -> Tensor:
        b = self.block
        if query:  # [B, H, Nq, F]: each query is the one row of its own "segment"
            if b.num_heads != x.shape[1]:
                x = x[:, b.start : b.start + b.num_heads]
            return x.reshape(x.shape[0], b.repeats, b.group, self.q_len, 1, x.shape[-1])
        # The keys come with their kv heads and dtype: only the rows read are cast, and each
        # head slot i takes the rows of its offset from its own kv heads.
        batch, kv_heads, features = x.shape[0], x.shape[1], x.shape[-1]
        index = torch.where(self.valid, self.position, 0).reshape(-1)  # [group * Nq * rows]
        x = _cast(x.index_select(2, index), self.dtype)
        x = x.reshape(batch, kv_heads, b.group, self.q_len * self.rows, features)
        per_kv_head = self.q_heads // kv_heads
        pieces = []
        for i in range(b.group):
            rows = x[:, :, i]
            heads = [(b.start + a * b.group + i) // per_kv_head for a in range(b.repeats)]
            if heads != list(range(kv_heads)):  # (an index built by tensor ops: traceable)
                head = torch.arange(b.repeats, device=x.device) * b.group + (b.start + i)
                head = torch.div(head, per_kv_head, rounding_mode="floor")
                rows = rows.index_select(1, head)
            pieces.append(rows)
        x = torch.stack(pieces, dim=2)  # [B, repeats, group, Nq * rows, F]
        return x.reshape(batch, b.repeats, b.group, self.q_len, self.rows, features)

    def scatter(self, y: Tensor, fill: float, query: bool = False) -> Tensor:
        b = self.block
        batch, features = y.shape[0], y.shape[-1]
        if query:  # [B, repeats, group, Nq, 1, F]; the queries off the offset are empty already
            return y.reshape(batch, b.num_heads, self.q_len, features)
        # [B, repeats, group, Nq, rows, F] summed into (head, key position) (a key may be read
        # by several queries); invalid rows carry zeros (their P is 0) and read position 0.
        position = torch.where(self.valid, self.position, 0)  # [group, Nq, rows]
        head = torch.arange(b.repeats, device=y.device).unsqueeze(-1) * b.group + torch.arange(
            b.group, device=y.device
        )  # [repeats, group]: the head's index in the block
        index = head.view(b.repeats, b.group, 1, 1) * self.kv_len + position
        out = y.new_zeros(batch, b.num_heads * self.kv_len, features)
        out = out.index_add(1, index.reshape(-1), y.reshape(batch, -1, features))
        return out.view(batch, b.num_heads, self.kv_len, features)

    def mask(self, is_causal: bool) -> Tensor:
        """[group, Nq, 1, rows]: the key rows each query sees."""
        keep = self.valid
        if is_causal:
            keep = keep & (self.query_position.unsqueeze(-1) >= self.position)
        return keep.unsqueeze(-2)

    def gather_mask(self, mask: _Mask) -> Tensor:
        """``attn_mask`` at each query's key rows: [Bm, repeats|1, group|1, Nq|1, 1, rows|1]."""
        group = self.block.group
        key = torch.where(self.valid, self.position, 0).view(1, 1, group, self.q_len, 1, self.rows)
        query = torch.arange(self.q_len, device=self.device).view(1, 1, 1, self.q_len, 1, 1)
        return _mask_entries(mask, self.block, query, key)


def _layout(block: _HeadBlock, q_len, kv_len, device, dtype, q_heads):
    """The layout of one head block: per query for a few queries known when tracing (at most
    the rows of a segment), else by segments (see ``_Layout``)."""
    w = min(block.segment_length, kv_len) if isinstance(kv_len, int) else block.segment_length
    if (
        isinstance(q_len, int)
        and q_len <= -(-w // block.rate)
        and not _statically_equal(q_len, kv_len)
    ):
        return _QueryRowsLayout(block, q_len, kv_len, device, dtype, q_heads)
    return _Layout(block, q_len, kv_len, device, dtype, q_heads)


def _expand_kv(x: Tensor, q_heads: int) -> Tensor:
    """[B, Hkv, N, F] -> [B, Hq, N, F], query head h reading kv head h // (Hq // Hkv)."""
    batch, kv_heads, seq_len, features = x.shape
    if kv_heads == q_heads:
        return x
    group = q_heads // kv_heads
    return x.unsqueeze(2).expand(batch, kv_heads, group, seq_len, features).reshape(
        batch, q_heads, seq_len, features
    )


def _reduce_kv(x: Tensor, kv_heads: int) -> Tensor:
    """Adjoint of ``_expand_kv``: sum the query heads that share a kv head."""
    batch, q_heads, seq_len, features = x.shape
    if kv_heads == q_heads:
        return x
    return x.reshape(batch, kv_heads, q_heads // kv_heads, seq_len, features).sum(2)


def _kv_inputs(k: Tensor, v: Tensor, q_len, dtype: torch.dtype, q_heads: int):
    """k and v as the layouts take them: cast and expanded to the query heads once when the
    rows cover the whole sequence; as they are with fewer queries, where each layout casts and
    expands only its window of positions (a decoding step must not copy the whole cache)."""
    if _statically_equal(q_len, k.shape[2]):
        return (_expand_kv(_cast(x, dtype), q_heads) for x in (k, v))
    return k, v


def _scale(scale: Optional[float], head_dim) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check(q: Tensor, k: Tensor, segment_lengths, dilation_rates, mode, is_causal,
           attn_mask) -> None:
    check_pattern(segment_lengths, dilation_rates, mode).check_num_heads(q.shape[1])
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the number of "
            f"key/value heads ({k.shape[1]})"
        )
    check_attn_mask(attn_mask, q, k)


def _rows_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``[..., S, rows, F]`` operands, each made contiguous first.

    matmul flattens the leading dims, a view. Inductor views a non-contiguous operand by
    reasoning on its sizes, and when the number of segments S is 1 in the example input it
    guards that S stays 1; an AOTInductor package checks no guard at run time, so it would
    silently give wrong results for longer sequences. Callers put the transposes on the small
    ``[rows, F]`` operands so that no ``[rows, rows]`` tensor is copied."""
    return torch.matmul(a.contiguous(), b.contiguous())


def _scores(
    layout: _Layout, qr: Tensor, kr: Tensor, scale: float, is_causal: bool,
    mask: Optional[_Mask],
) -> Tensor:
    """Scores of the block's rows, -inf where the pattern (padding, causal) or a bool mask
    removes the pair; a float mask is added."""
    scores = _rows_matmul(qr, kr.transpose(-1, -2)) * scale
    keep = layout.mask(is_causal)
    if mask is not None:
        picked = layout.gather_mask(mask)
        if mask.is_bool:
            keep = keep & picked
        else:
            scores = scores + _cast(picked, scores.dtype)
    return torch.where(keep, scores, _NEG_INF)


def _block_attention(
    layout: _Layout, q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool,
    mask: Optional[_Mask] = None,
) -> tuple[Tensor, Tensor]:
    """One head block under one config: out [B, h, Nq, Dv] and lse [B, h, Nq] (-inf off its
    rows)."""
    qr, kr, vr = layout.gather(q, query=True), layout.gather(k), layout.gather(v)
    scores = _scores(layout, qr, kr, scale, is_causal, mask)
    # Guarded softmax: a row without keys (padding rows, rows the mask empties) has a zero
    # denominator, out 0 and lse -inf, never NaN, in the forward and the backward.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == _NEG_INF, 0.0, row_max)
    weights = torch.exp(scores - row_max)
    denominator = weights.sum(dim=-1, keepdim=True)
    nonempty = denominator > 0
    denominator = torch.where(nonempty, denominator, 1.0)
    out = _rows_matmul(weights, vr) / denominator
    lse = torch.where(nonempty, torch.log(denominator) + row_max, _NEG_INF)
    return (
        layout.scatter(out, 0.0, query=True),
        layout.scatter(lse, _NEG_INF, query=True).squeeze(-1),
    )


def size_oblivious() -> contextlib.AbstractContextManager:
    """Trace or lower with a symbolic N without specialising on the number of segments being 1.

    With a symbolic N the number of segments S = ceil(N / w) is symbolic too and may be 1, and
    reshapes and contiguity checks would otherwise specialise the graph to S >= 2 (or S == 1)
    from the example input. Every operation here is correct for S == 1 as well (S is never
    broadcast against a size-1 dimension), so it can be traced size-obliviously, as
    torch.onnx does for all of its decompositions. ``aot_compile`` lowers under it too: Inductor
    reads sizes from the example input, and a package checks no guard at run time, so an
    example with one segment would otherwise give code that is wrong for longer sequences."""
    config = torch.fx.experimental._config
    if hasattr(config, "backed_size_oblivious"):
        return config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _sum(tensors: list[Tensor]) -> Tensor:
    return functools.reduce(operator.add, tensors)


def _merge(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of per-config results (LongNet eq. 10); rows empty in every config
    give out 0 and lse -inf."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.stack(lses)
    top = lse.amax(dim=0)
    top = torch.where(top == _NEG_INF, 0.0, top)
    weights = torch.exp(lse - top)  # [C, B, H, N]
    total = weights.sum(dim=0)
    nonempty = total > 0
    total = torch.where(nonempty, total, 1.0)
    out = _sum([o * (w / total).unsqueeze(-1) for o, w in zip(outs, weights.unbind(0))])
    return out, torch.where(nonempty, torch.log(total) + top, _NEG_INF)


def dilated_attention_decomposition(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``torch.ops.dilated_compile.dilated_attention`` in aten ops (same arguments, same results).

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]``; v: ``[B, Hkv, Nk, Dv]`` (``Hq % Hkv == 0``,
            ``Nq <= Nk``: query ``i`` is position ``Nk - Nq + i``).
        segment_lengths, dilation_rates, mode, is_causal, scale: as for the op.
        attn_mask: as for the op: None, or bool (True = keep) / float (added to the scores),
            broadcastable to ``[B, Hq, Nq, Nk]``; read only at the pairs the pattern keeps
            (broadcast dims are never expanded).

    Returns:
        ``(out, lse)``: ``[B, Hq, Nq, Dv]`` in ``q.dtype`` and ``[B, Hq, Nq]`` in float32
        (float64 for float64 inputs). Computed in that float precision, like the op.

    Cost: ``O(N * w / r)`` time and memory per head and config; ``N`` may be symbolic. With
    fewer queries than keys, ``N`` counts only the segments that hold a query.

    Example::

        >>> q = k = v = torch.randn(1, 4, 100, 16)
        >>> out, lse = dilated_attention_decomposition(q, k, v, [32, 64], [1, 2], "mixture", True, None)
        >>> padding = torch.arange(100) < 90  # [Nk]: the last 10 keys are padding
        >>> out, lse = dilated_attention_decomposition(
        ...     q[:, :, -1:], k, v, [32, 64], [1, 2], "mixture", False, None, padding)
    """
    with size_oblivious():
        return _forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, attn_mask)


def _forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, attn_mask=None):
    _check(q, k, segment_lengths, dilation_rates, mode, is_causal, attn_mask)
    batch, q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    cdtype = _accumulation_dtype(q.dtype)
    scale = _scale(scale, head_dim)
    if isinstance(q_len, int) and q_len == 0:
        out = q.new_zeros(batch, q_heads, 0, v.shape[-1])
        return out, q.new_zeros(batch, q_heads, 0, dtype=cdtype)
    mask = None if attn_mask is None else _Mask(attn_mask)
    qc, kc, vc = _cast(q, cdtype), *_kv_inputs(k, v, q_len, cdtype, q_heads)
    config_outs, config_lses = [], []
    for blocks in _head_blocks(segment_lengths, dilation_rates, mode, q_heads):
        outs, lses = [], []
        for block in blocks:
            layout = _layout(block, q_len, kv_len, q.device, cdtype, q_heads)
            out, lse = _block_attention(layout, qc, kc, vc, scale, is_causal, mask)
            outs.append(out)
            lses.append(lse)
        config_outs.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
        config_lses.append(lses[0] if len(lses) == 1 else torch.cat(lses, dim=1))
    if mode == "head_groups":  # configs hold disjoint heads, in order
        out, lse = torch.cat(config_outs, dim=1), torch.cat(config_lses, dim=1)
    else:
        out, lse = _merge(config_outs, config_lses)
    return _cast(out, q.dtype), lse


def dilated_attention_backward_decomposition(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_lse: Optional[Tensor],
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.dilated_compile.dilated_attention_backward`` in aten ops: ``(dq, dk, dv)``.

    FlashAttention-2 style, like the op: with the final ``lse`` and ``delta = rowsum(dO * O) -
    dL/dlse``, each config's probabilities ``P = exp(S - lse)`` are recomputed on its rows (the
    mask applied as in the forward) and ``dV += P^T dO``, ``dS = P * (dO V^T - delta) * scale``,
    ``dQ += dS K``, ``dK += dS^T Q``. Rows with no key get zero gradient. Same cost bound as the
    forward decomposition.

    Example::

        >>> args = ([32, 64], [1, 2], "mixture", True, None)
        >>> out, lse = dilated_attention_decomposition(q, k, v, *args)
        >>> dq, dk, dv = dilated_attention_backward_decomposition(
        ...     torch.ones_like(out), q, k, v, out, lse, None, *args)
    """
    with size_oblivious():
        return _backward(
            grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode,
            is_causal, scale, attn_mask,
        )


def _backward(
    grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode, is_causal, scale,
    attn_mask=None,
):
    _check(q, k, segment_lengths, dilation_rates, mode, is_causal, attn_mask)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    cdtype = _accumulation_dtype(q.dtype)
    scale = _scale(scale, head_dim)
    if isinstance(q_len, int) and q_len == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    mask = None if attn_mask is None else _Mask(attn_mask)
    qc, doc = _cast(q, cdtype), _cast(grad_out, cdtype)
    kc, vc = _kv_inputs(k, v, q_len, cdtype, q_heads)
    delta = (doc * _cast(out, cdtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - _cast(grad_lse, cdtype)
    # A row with lse -inf (padding rows; rows that attend nothing) has every score -inf: read
    # as 0 its P is exactly 0, never NaN (padding rows also have dO = 0).
    lse = _cast(lse, cdtype)
    lse = torch.where(lse == _NEG_INF, 0.0, lse).unsqueeze(-1)
    delta = delta.unsqueeze(-1)
    dq_parts, dk_parts, dv_parts = [], [], []
    for blocks in _head_blocks(segment_lengths, dilation_rates, mode, q_heads):
        dqs, dks, dvs = [], [], []
        for block in blocks:
            layout = _layout(block, q_len, kv_len, q.device, cdtype, q_heads)
            qr, kr, vr = layout.gather(qc, query=True), layout.gather(kc), layout.gather(vc)
            dor = layout.gather(doc, query=True)
            scores = _scores(layout, qr, kr, scale, is_causal, mask)
            p = torch.exp(scores - layout.gather(lse, query=True))
            dp = _rows_matmul(dor, vr.transpose(-1, -2))
            ds = p * (dp - layout.gather(delta, query=True)) * scale
            dqs.append(layout.scatter(_rows_matmul(ds, kr), 0.0, query=True))
            # dK = dS^T Q and dV = P^T dO, as (Q^T dS)^T and (dO^T P)^T: see _rows_matmul.
            dks.append(layout.scatter(_rows_matmul(qr.transpose(-1, -2), ds).transpose(-1, -2), 0.0))
            dvs.append(layout.scatter(_rows_matmul(dor.transpose(-1, -2), p).transpose(-1, -2), 0.0))
        for parts, pieces in ((dq_parts, dqs), (dk_parts, dks), (dv_parts, dvs)):
            parts.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    if mode == "head_groups":  # configs hold disjoint heads, in order
        dq, dk, dv = (torch.cat(parts, dim=1) for parts in (dq_parts, dk_parts, dv_parts))
    else:
        dq, dk, dv = (_sum(parts) for parts in (dq_parts, dk_parts, dv_parts))
    dk, dv = _reduce_kv(dk, kv_heads), _reduce_kv(dv, kv_heads)
    return _cast(dq, q.dtype), _cast(dk, k.dtype), _cast(dv, v.dtype)


def dilated_attention_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """A decomposition table for the ``torch.ops.dilated_compile.*`` ops (the dilated and the
    block-sparse families).

    Use it with ``ExportedProgram.run_decompositions`` (only our ops are decomposed), merged into
    ``torch.export.default_decompositions()`` (core ATen and our ops), or with ``make_fx``.

    Example::

        >>> program = dilated_compile.export(model, (x,))
        >>> plain = program.run_decompositions(dilated_attention_decompositions())
        >>> table = torch.export.default_decompositions()
        >>> table.update(dilated_attention_decompositions())
        >>> core_aten = program.run_decompositions(table)
    """
    from .block_sparse_decompositions import block_sparse_attention_decompositions

    return {
        dilated_attention_op: dilated_attention_decomposition,
        dilated_attention_backward_op: dilated_attention_backward_decomposition,
        **block_sparse_attention_decompositions(),
    }
