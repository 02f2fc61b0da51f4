"""Triton kernels for dilated attention (forward, backward) and their launchers.

One launch attends one config (mixture: every head, offset ``h mod r``) or head groups
(head_groups: each its heads, one fixed offset; up to four groups per query-side launch). A
program takes ``BLOCK_M`` consecutive *dilated* rows of one segment — positions
``s*w + o + j*r`` — and walks that segment's dilated key rows through strided pointers: no
gather copies, and the score tile is the dense tile of the segment's dilated sub-problem, so no
block is partly wasted the way a block mask would waste it.

Configs are merged by log-sum-exp inside the forward kernel: a launch reads the running fp32
output and lse of its rows, merges its own (already normalised) result and writes them back; a
rate-1 config over every head runs last and writes the output in its final dtype. Launches of
one call run one after another on one stream, so every row has one writer at a time and the
result is deterministic. head_groups' query-side kernels take up to four groups per launch
(``PARTS``: each head finds its group's config). The backward is FlashAttention-2 style with the
*final* lse and Delta = rowsum(dO * O) - dL/dlse: each config's share of dq (per query block)
and of dk/dv (per key block, summing the query heads of a GQA group inside the program) is
computed without atomics and added into fp32 accumulators, again one launch at a time.

Queries may be fewer than keys (``Nq <= Nk``): query ``i`` stands at position ``Nk - Nq + i`` of
the key sequence, so only segments that hold query positions get query programs, and a program's
first rows may stand before the first query (they are masked off). ``attn_mask`` (bool or float,
a ``[B, Hq, Nq, Nk]`` view whose broadcast dims have stride 0) is read through its strides at the
tiles a program visits; a mask constant along the queries (key padding) is read as one key vector
per tile, and only by programs whose keys it neither keeps nor removes entirely (prefix counts
of the mask tell which, at four loads a program): where a padding mask keeps a whole segment
the program runs the unmasked loop, where it removes one it does no work. Both are
constexpr-gated (``QUERY_TAIL``, ``HAS_MASK``), so a call with neither compiles to kernels
that hold none of their code.

Scores are kept in the log2 domain (``exp2``, scale premultiplied by log2(e)); the lse the op
returns is the natural-log one, converted at the boundary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._pattern import head_parts
from ._common import (
    _LN2,
    _LOG2E,
    LOG2E,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    _bias_of,
    _configs,
    _dot_precision,
    _empty_rows_give_zero,
    _finite_or_zero,
    _load,
    _mask_base,
    _mask_bias,
    _mask_tile,
    _online_softmax,
    _online_softmax_start,
    _probs,
    _weights,
    _scores,
    _along_keys,
    _along_queries,
    _dkdv_products,
    _dkdv_scores,
    _dq_products,
    BY_KEY,
    BY_QUERY,
    jit_with_scalars,
    launch_tuned,
    launch_delta,
    mask_operand,
)
from .tuning import tuned

# Keyed on the rows per segment (bucketed by the spec, not by N), the head dims, causality, mask,
# fewer queries than keys and the merge flag (the autotuner adds the tensors' dtypes): a new
# sequence length never retunes.
_TUNE_KEY = ["rows_bucket", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_MASK", "QUERY_TAIL"]

# Scalars that vary with the spec, the heads and N are not specialised on (== 1, % 16): each
# such value would compile another variant of every kernel. Strides stay specialised, since
# 16-byte alignment of the rows is what lets the loads vectorise.
_SCALARS = [
    "N", "NQ", "head_lo", "head_count", "kv_group", "seg_len", "rate", "fixed_offset", "rows_bucket",
    "num_heads", "num_kv_heads", "kv_lo", "kv_count", "num_offsets",
    "lo1", "w1", "r1", "o1", "lo2", "w2", "r2", "o2", "lo3", "w3", "r3", "o3",
]

_jit = jit_with_scalars(_SCALARS)


# BLOCK_M is a multiple of BLOCK_N in every forward and dq config, and BLOCK_N of BLOCK_M in
# every dk/dv config: the split of each walk into whole and edge blocks relies on it (the causal
# diagonal then covers whole blocks).
# float32 tiles take twice the shared memory, so float32 inputs get a kernel tuned over smaller
# blocks (the first of each list fits every supported head dim).
_FWD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
])
_FWD_CONFIGS_FP32 = _configs([(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2)])
_DQ_CONFIGS = _configs([
    (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 2),
])
_DQ_CONFIGS_FP32 = _configs([(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2)])
# For dk/dv, BLOCK_N is the key block a program owns and BLOCK_M the query block it walks; the
# BY_QUERY candidates lay the score tiles [queries, keys] (``_along_keys``), which the H200's
# tuning picks at head dim 64 (64 x 64 tiles: 64-wide wgmma, no spills; BENCHMARKS' workload).
_DKDV_CONFIGS = _configs([
    (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 4),
    (64, 64, 4, 3, BY_QUERY), (64, 64, 4, 4, BY_QUERY),
], BY_KEY)
_DKDV_CONFIGS_FP32 = _configs([(32, 64, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2)], BY_KEY)


@triton.jit
def _segment_rows(seg, seg_len, N, offset, rate):
    """First position and number of dilated rows of segment ``seg`` for ``offset``."""
    seg_start = seg * seg_len
    this_len = tl.minimum(seg_len, N - seg_start)
    n_rows = (this_len - offset + rate - 1) // rate  # <= 0 when the offset falls past the end
    return seg_start + offset, n_rows


@triton.jit
def _first_query_row(row0, q_off, rate):
    """Index of the first dilated row (positions ``row0 + j * rate``) at or after ``q_off``, the
    position of the first query."""
    return tl.maximum(q_off - row0 + rate - 1, 0) // rate


@triton.jit
def _segment_of(pid_seg, N, NQ, seg_len, QUERY_TAIL: tl.constexpr):
    """The segment of a program's ``pid_seg`` and the first query's position: with fewer queries
    than keys the grid covers only the segments from the one holding that position."""
    if QUERY_TAIL:
        q_off = N - NQ
        seg = pid_seg + q_off // seg_len
    else:
        q_off = 0
        seg = pid_seg
    return seg, q_off


@triton.jit
def _valid_rows(rows, first, n_rows, QUERY_TAIL: tl.constexpr):
    """Which dilated rows of a block are queries: rows before ``first`` stand before the first
    query position (only when ``QUERY_TAIL``), rows from ``n_rows`` on are past the segment."""
    if QUERY_TAIL:
        valid = (rows >= first) & (rows < n_rows)
    else:
        valid = rows < n_rows
    return valid


@triton.jit
def _part_of(h, seg_len, rate, fixed_offset, lo1, w1, r1, o1, lo2, w2, r2, o2, lo3, w3, r3, o3,
             PARTS: tl.constexpr):
    """The config (segment length, rate, offset) of head ``h`` in a launch of ``PARTS`` head
    parts: part 0's are the launch's own scalars, parts 1, 2, 3 start at heads ``lo1``, ``lo2``,
    ``lo3`` with theirs (head_groups: each part a contiguous run of heads, ``_GroupedLaunch``).
    Selects rather than branches: under torch.compile a scalar equal to 1 arrives as a
    constexpr, which a runtime branch may not rebind to a value."""
    if PARTS > 1:
        seg_len, rate, fixed_offset = _later_part(h >= lo1, seg_len, rate, fixed_offset, w1, r1, o1)
    if PARTS > 2:
        seg_len, rate, fixed_offset = _later_part(h >= lo2, seg_len, rate, fixed_offset, w2, r2, o2)
    if PARTS > 3:
        seg_len, rate, fixed_offset = _later_part(h >= lo3, seg_len, rate, fixed_offset, w3, r3, o3)
    return seg_len, rate, fixed_offset


@triton.jit
def _later_part(later, seg_len, rate, fixed_offset, w, r, o):
    return tl.where(later, w, seg_len), tl.where(later, r, rate), tl.where(later, o, fixed_offset)


@triton.jit
def _query_program(N, NQ, head_lo, head_count, seg_len, rate, fixed_offset, lo1, w1, r1, o1,
                   lo2, w2, r2, o2, lo3, w3, r3, o3, BLOCK_M: tl.constexpr,
                   QUERY_TAIL: tl.constexpr, IS_CAUSAL: tl.constexpr, PARTS: tl.constexpr):
    """The query-side program's place, from its ids (block of dilated rows, segment, batch x
    head): (row block, batch, head, first position and number of the segment's dilated rows,
    first query row, position of the first query, the head's rate). Row blocks stay aligned to
    ``BLOCK_M`` within the segment, so the causal split below still starts on a block boundary.
    Causal programs take their segment's blocks last first: block ``j`` walks ``j + 1`` key
    blocks, and starting the long ones first leaves short ones, not long ones, to fill the
    launch's last wave. With several head parts (``_part_of``) the grid spans the largest
    part's blocks and segments; a smaller part's programs beyond its own return at once."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(2)
    b = pid_bh // head_count
    h = head_lo + pid_bh % head_count
    seg_len, rate, fixed_offset = _part_of(h, seg_len, rate, fixed_offset, lo1, w1, r1, o1, lo2,
                                           w2, r2, o2, lo3, w3, r3, o3, PARTS)
    seg, q_off = _segment_of(tl.program_id(1), N, NQ, seg_len, QUERY_TAIL)
    offset = fixed_offset if fixed_offset >= 0 else h % rate
    row0, n_rows = _segment_rows(seg, seg_len, N, offset, rate)
    if QUERY_TAIL:
        first = _first_query_row(row0, q_off, rate)
        block = first // BLOCK_M + pid_m
    else:
        first = 0
        block = pid_m
    return block, b, h, row0, n_rows, first, q_off, rate


@triton.jit
def _query_tile(block, row0, n_rows, first, q_off, rate, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                QUERY_TAIL: tl.constexpr):
    """A query program's offsets: its dilated rows, a key tile's, the head dims', which rows are
    queries, and their rows in q, out, lse and the mask (``[Nq]`` indices)."""
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m_valid = _valid_rows(offs_m, first, n_rows, QUERY_TAIL)
    q_rows = row0 - q_off + offs_m * rate
    return offs_m, offs_n, offs_d, offs_dv, m_valid, q_rows


# What a key span holds of a mask constant along the queries (key padding): every entry neutral
# (True, or 0.0), every entry removing its pair (False, or -inf), or a mix. With such a mask the
# launchers run each kernel twice (constexpr SPAN_FILTER): 1 = only the programs whose keys are
# all neutral, without reading the mask; 2 = the others, reading it (none where all are removed).
# Two launches rather than a branch inside one: each launch keeps the single top-level key loop
# that the pipeliner handles, and a padded batch costs about an unmasked one.
_SPAN_NEUTRAL = tl.constexpr(0)
_SPAN_MIXED = tl.constexpr(1)
_SPAN_REMOVED = tl.constexpr(2)


@triton.jit
def _key_span_state(Counts, b, h, scb, sch, N, row0, lo_row, hi_row, rate):
    """How the key-padding mask treats the dilated key rows ``[lo_row, hi_row)`` (positions
    ``row0 + j * rate``), from ``Counts`` (per batch and head, two planes of ``N + 1`` prefix
    counts along the keys: of non-neutral entries, of removing ones). The dense span from the
    first to the last of those positions is checked, a superset: a mixed answer is always safe."""
    base = Counts + b.to(tl.int64) * scb + h.to(tl.int64) * sch
    lo = row0 + lo_row * rate
    hi = tl.maximum(row0 + (hi_row - 1) * rate + 1, lo)  # one past the last key's position
    nonneutral = tl.load(base + hi) - tl.load(base + lo)
    removed = tl.load(base + (N + 1) + hi) - tl.load(base + (N + 1) + lo)
    return tl.where(nonneutral == 0, _SPAN_NEUTRAL,
                    tl.where(removed == hi - lo, _SPAN_REMOVED, _SPAN_MIXED))


@triton.jit
def _key_range(block, n_rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr):
    """(full_end, hi): the key rows ``[0, hi)`` a query-side program (forward, dq) of row block
    ``block`` walks, those before ``full_end`` needing no bounds or causal check. Those come
    first (BLOCK_M is a multiple of BLOCK_N, so the causal diagonal starts on a block boundary),
    then the partly masked tail."""
    if IS_CAUSAL:
        full_end = block * BLOCK_M
        hi = tl.minimum((block + 1) * BLOCK_M, n_rows)
    else:
        full_end = (n_rows // BLOCK_N) * BLOCK_N
        hi = n_rows
    return full_end, hi


@triton.jit
def _fwd_keys(
    acc, l_i, m_i, q, k_base, v_base, k_step, v_step, skd, svd, mask_rows, mask_keys, smk,
    offs_m, offs_n, offs_d, offs_dv, m_valid, n_rows, rate, lo, hi, scale_log2,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr,
    APPLY_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    RAW: tl.constexpr, EDGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward's online softmax over the key rows ``[lo, hi)`` of a program's segment.
    ``EDGE``: the tiles may reach past the rows or onto the causal diagonal, so each pair is
    checked; without it (the blocks before ``_key_range``'s ``full_end``) none is, and the loads
    are unmasked. ``APPLY_MASK``: read and add the mask (``HAS_MASK`` alone keeps the guards for
    rows a mask may empty). ``RAW``: scores stay raw products, the scale applied in the exponent
    (``_online_softmax``)."""
    if APPLY_MASK:
        # Each tile's entries are loaded one tile ahead, so the load's latency hides behind a
        # tile of work: the pipeliner prefetches only the loads that feed a dot.
        mask_next = _mask_tile(mask_rows, mask_keys, lo, offs_n, n_rows, rate, smk, m_valid,
                               MASK_PER_QUERY)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < n_rows
        k = _load(k_base + cols[None, :] * k_step + offs_d[:, None] * skd, n_valid[None, :], EDGE)
        v = _load(v_base + cols[:, None] * v_step + offs_dv[None, :] * svd, n_valid[:, None], EDGE)
        s = _scores(tl.dot(q, k, input_precision=DOT_PRECISION), scale_log2, RAW)
        if EDGE:
            keep = n_valid[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        if APPLY_MASK:
            s += _bias_of(mask_next, MASK_BOOL)
            mask_next = _mask_tile(mask_rows, mask_keys, start_n + BLOCK_N, offs_n, n_rows, rate,
                                   smk, m_valid, MASK_PER_QUERY)
        # Without a mask the row maximum is finite: every row keeps key 0 of its first block
        # (itself or an earlier row); a mask can empty a row, hence the guarded base.
        acc, l_i, m_i = _online_softmax(acc, l_i, m_i, s, v, scale_log2, RAW, HAS_MASK,
                                        DOT_PRECISION)
    return acc, l_i, m_i


@_jit
def dilated_attention_fwd_kernel(
    Q, K, V, Out, Prev, Lse, Mask, Counts,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, son, sod, slb, slh, sln, smb, smh, smq, smk, scb, sch,
    N, NQ, head_lo, head_count, kv_group, seg_len, rate, fixed_offset, scale_log2, rows_bucket,
    lo1, w1, r1, o1, lo2, w2, r2, o2, lo3, w3, r3, o3,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr, PARTS: tl.constexpr,
    MERGE: tl.constexpr, DOT_PRECISION: tl.constexpr, QUERY_TAIL: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    SPAN_FILTER: tl.constexpr, FUSED_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Out and Lse of one block of a segment's dilated query rows for this launch's config.
    ``MERGE``: merge by log-sum-exp with the running result of earlier launches, read from
    ``Prev`` (fp32, Out's strides; Out itself, or the fp32 buffer when this last launch writes
    the final dtype) and Lse, where Lse is not -inf (a row no launch has written yet: Prev
    unread there). ``FUSED_SCALE``: the scale is positive (``_online_softmax``'s ``RAW``)."""
    # Inductor may pass the scale as a float64 scalar; keep the softmax state in float32.
    scale_log2 = tl.cast(scale_log2, tl.float32)
    block, b, h, row0, n_rows, first, q_off, rate = _query_program(
        N, NQ, head_lo, head_count, seg_len, rate, fixed_offset, lo1, w1, r1, o1, lo2, w2, r2, o2,
        lo3, w3, r3, o3, BLOCK_M, QUERY_TAIL, IS_CAUSAL, PARTS)
    if block * BLOCK_M >= n_rows:
        return
    kvh = h // kv_group

    offs_m, offs_n, offs_d, offs_dv, m_valid, q_rows = _query_tile(
        block, row0, n_rows, first, q_off, rate, BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V, QUERY_TAIL)

    q = tl.load(Q + b * sqb + h * sqh + q_rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_valid[:, None], other=0.0)
    k_base = K + b * skb + kvh * skh + row0 * skn
    v_base = V + b * svb + kvh * svh + row0 * svn
    # A mask constant along the queries (key padding) is read as one key vector per tile.
    mask_rows = _mask_base(Mask, b, h, smb, smh)
    if MASK_PER_QUERY:
        mask_rows += q_rows.to(tl.int64)[:, None] * smq
    mask_keys = (row0 + offs_n * rate) * smk

    acc, l_i, m_i = _online_softmax_start(BLOCK_M, HEAD_DIM_V)
    full_end, hi = _key_range(block, n_rows, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if SPAN_FILTER != 0:
        # Key padding, split over two launches (SPAN_FILTER, above): the first takes the
        # programs whose keys the mask keeps entirely, unmasked; the second the others, masked,
        # with no work where it removes every key (the rows get out 0, lse -inf here).
        span = _key_span_state(Counts, b, h, scb, sch, N, row0, 0, hi, rate)
        if SPAN_FILTER == 1:
            if span != _SPAN_NEUTRAL:
                return
        else:
            if span == _SPAN_NEUTRAL:
                return
            full_end = tl.where(span == _SPAN_REMOVED, 0, full_end)
            hi = tl.where(span == _SPAN_REMOVED, 0, hi)
    for edge in tl.static_range(2):  # the full blocks, then the edge ones
        acc, l_i, m_i = _fwd_keys(
            acc, l_i, m_i, q, k_base, v_base, rate * skn, rate * svn, skd, svd, mask_rows,
            mask_keys, smk, offs_m, offs_n, offs_d, offs_dv, m_valid, n_rows, rate,
            full_end if edge else 0, hi if edge else full_end, scale_log2,
            IS_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION, HAS_MASK=HAS_MASK,
            APPLY_MASK=HAS_MASK and SPAN_FILTER != 1, MASK_BOOL=MASK_BOOL,
            MASK_PER_QUERY=MASK_PER_QUERY,
            RAW=FUSED_SCALE and not (HAS_MASK and SPAN_FILTER != 1), EDGE=edge == 1,
            BLOCK_N=BLOCK_N)

    if HAS_MASK:  # a row that kept no key: out 0, lse -inf + log2(1) = -inf
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i)
    o_ptrs = Out + b * sob + h * soh + q_rows[:, None] * son + offs_dv[None, :] * sod
    l_ptrs = Lse + b * slb + h * slh + q_rows * sln
    if MERGE:
        # Log-sum-exp merge with what earlier configs wrote for these rows (-inf: nothing yet).
        old2 = tl.load(l_ptrs, mask=m_valid, other=float("-inf")) * _LOG2E
        new2 = tl.maximum(old2, lse2)
        top = _finite_or_zero(new2, HAS_MASK)
        new2 = top + tl.math.log2(tl.math.exp2(old2 - top) + tl.math.exp2(lse2 - top))
        norm = _finite_or_zero(new2, HAS_MASK)
        written = m_valid & (old2 != float("-inf"))
        old_out = tl.load(Prev + b * sob + h * soh + q_rows[:, None] * son + offs_dv[None, :] * sod,
                          mask=written[:, None], other=0.0)
        out = old_out * tl.math.exp2(old2 - norm)[:, None] + out * tl.math.exp2(lse2 - norm)[:, None]
        lse2 = new2
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None])
    tl.store(l_ptrs, lse2 * _LN2, mask=m_valid)


@triton.jit
def _dq_keys(
    dq, q, do, lse2, row_delta, k_base, v_base, skn, svn, skd, svd, mask_rows, mask_keys, smk,
    offs_m, offs_n, offs_d, offs_dv, m_valid, n_rows, rate, lo, hi, scale_log2,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr,
    APPLY_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    EDGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of a program's query rows over the key rows ``[lo, hi)`` of its segment (see
    ``_fwd_keys`` for ``APPLY_MASK``). ``EDGE``: the tiles may reach past the rows or onto the
    causal diagonal, so each pair is checked; without it (the blocks before ``_key_range``'s
    ``full_end``) none is, which spares a compare and a select per score."""
    if APPLY_MASK:  # loaded one tile ahead, as in the forward
        mask_next = _mask_tile(mask_rows, mask_keys, lo, offs_n, n_rows, rate, smk, m_valid,
                               MASK_PER_QUERY)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < n_rows  # (whole tiles: every key row is in the segment, unchecked)
        k = _load(k_base + cols[:, None] * (rate * skn) + offs_d[None, :] * skd, n_valid[:, None],
                  EDGE)
        v = _load(v_base + cols[:, None] * (rate * svn) + offs_dv[None, :] * svd,
                  n_valid[:, None], EDGE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if APPLY_MASK:
            s += _bias_of(mask_next, MASK_BOOL)
            mask_next = _mask_tile(mask_rows, mask_keys, start_n + BLOCK_N, offs_n, n_rows, rate,
                                   smk, m_valid, MASK_PER_QUERY)
        if EDGE:
            keep = m_valid[:, None] & n_valid[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            p = _probs(s, lse2[:, None], keep, HAS_MASK and not MASK_BOOL)
        else:  # rows past the segment have their own garbage, never stored
            p = _weights(s, lse2[:, None], HAS_MASK and not MASK_BOOL)
        dq = _dq_products(dq, p, k, v, do, row_delta, DOT_PRECISION)
    return dq


@_jit
def dilated_attention_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, DQ, Mask, Counts,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sgb, sgh, sgn, sgd, slb, slh, sln, smb, smh, smq, smk, scb, sch,
    N, NQ, num_heads, head_lo, head_count, kv_group, seg_len, rate, fixed_offset, scale_log2,
    rows_bucket, lo1, w1, r1, o1, lo2, w2, r2, o2, lo3, w3, r3, o3,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr, PARTS: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr, QUERY_TAIL: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    SPAN_FILTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """This launch's share of dq, added into DQ (fp32) when ACCUMULATE, else written (DQ in
    q's dtype, or the fp32 buffer's first write). DQ is contiguous [B, Hq, NQ, D]."""
    # Inductor may pass the scale as a float64 scalar; keep the softmax state in float32.
    scale_log2 = tl.cast(scale_log2, tl.float32)
    block, b, h, row0, n_rows, first, q_off, rate = _query_program(
        N, NQ, head_lo, head_count, seg_len, rate, fixed_offset, lo1, w1, r1, o1, lo2, w2, r2, o2,
        lo3, w3, r3, o3, BLOCK_M, QUERY_TAIL, IS_CAUSAL, PARTS)
    if block * BLOCK_M >= n_rows:
        return
    kvh = h // kv_group

    offs_m, offs_n, offs_d, offs_dv, m_valid, q_rows = _query_tile(
        block, row0, n_rows, first, q_off, rate, BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V, QUERY_TAIL)

    q = tl.load(Q + b * sqb + h * sqh + q_rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_valid[:, None], other=0.0)
    do = tl.load(dOut + b * sgb + h * sgh + q_rows[:, None] * sgn + offs_dv[None, :] * sgd,
                 mask=m_valid[:, None], other=0.0)
    lse2 = tl.load(Lse + b * slb + h * slh + q_rows * sln, mask=m_valid, other=0.0) * _LOG2E
    lse2 = _empty_rows_give_zero(lse2, HAS_MASK)
    row_delta = tl.load(Delta + (b * num_heads + h) * NQ + q_rows, mask=m_valid, other=0.0)
    k_base = K + b * skb + kvh * skh + row0 * skn
    v_base = V + b * svb + kvh * svh + row0 * svn
    mask_rows = _mask_base(Mask, b, h, smb, smh)
    if MASK_PER_QUERY:
        mask_rows += q_rows.to(tl.int64)[:, None] * smq
    mask_keys = (row0 + offs_n * rate) * smk

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, hi = _key_range(block, n_rows, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if SPAN_FILTER != 0:  # key padding in two launches, as in the forward
        span = _key_span_state(Counts, b, h, scb, sch, N, row0, 0, hi, rate)
        if SPAN_FILTER == 1:  # the others' dq is 0 here (the second launch adds it)
            full_end = tl.where(span == _SPAN_NEUTRAL, full_end, 0)
            hi = tl.where(span == _SPAN_NEUTRAL, hi, 0)
        else:
            if span != _SPAN_MIXED:
                return
    for edge in tl.static_range(2):  # the full blocks, then the edge ones
        dq = _dq_keys(
            dq, q, do, lse2, row_delta, k_base, v_base, skn, svn, skd, svd, mask_rows, mask_keys,
            smk, offs_m, offs_n, offs_d, offs_dv, m_valid, n_rows, rate,
            full_end if edge else 0, hi if edge else full_end, scale_log2,
            IS_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION, HAS_MASK=HAS_MASK,
            APPLY_MASK=HAS_MASK and SPAN_FILTER != 1, MASK_BOOL=MASK_BOOL,
            MASK_PER_QUERY=MASK_PER_QUERY, EDGE=edge == 1, BLOCK_N=BLOCK_N)

    dq_ptrs = DQ + (b * num_heads + h) * NQ * HEAD_DIM + q_rows[:, None] * HEAD_DIM + offs_d[None, :]
    dq = dq * (scale_log2 * _LN2)
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=m_valid[:, None], other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])


@triton.jit
def _dkdv_queries(
    dk, dv, k, v, q_base, do_base, l_base, d_base, mask_keys, sqn, sqd, sgn, sgd, sln, smq,
    offs_m, offs_n, offs_d, offs_dv, n_valid, row0, q_off, first, lo, n_head, tail, steps, n_rows,
    rate, scale_log2, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    QUERY_TAIL: tl.constexpr, HAS_MASK: tl.constexpr, APPLY_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr, EDGE: tl.constexpr,
    BY_QUERY: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dk, dv of a program's key rows from ``steps`` blocks of one query head's rows of the
    segment's ``n_rows``: the ``n_head`` blocks from row ``lo``, then those from row ``tail``
    (see ``_fwd_keys`` for ``APPLY_MASK``). ``EDGE``: the blocks may reach past the rows, before
    the first query or onto the causal diagonal, so each pair is checked; without it (the blocks
    ``_query_blocks`` finds whole) none is, which spares a compare and a select per score.
    ``BY_QUERY``: score tiles [queries, keys] instead of [keys, queries] (``_along_keys``)."""
    if APPLY_MASK and not MASK_PER_QUERY:  # one key vector serves every query row
        key_bias = _mask_bias(mask_keys, _along_keys(n_valid, BY_QUERY), MASK_BOOL)
    for step in range(0, steps):
        start_m = lo + step * BLOCK_M
        if EDGE:
            start_m = tl.where(step < n_head, start_m, tail + (step - n_head) * BLOCK_M)
        rows = start_m + offs_m
        m_valid = _valid_rows(rows, first, n_rows, QUERY_TAIL)  # (whole blocks: all, unchecked)
        q = _load(q_base + rows[:, None] * (rate * sqn) + offs_d[None, :] * sqd, m_valid[:, None],
                  EDGE)
        do = _load(do_base + rows[:, None] * (rate * sgn) + offs_dv[None, :] * sgd,
                   m_valid[:, None], EDGE)
        lse2 = _load(l_base + rows * (rate * sln), m_valid, EDGE)
        row_delta = _load(d_base + rows * rate, m_valid, EDGE)
        lse2 = _empty_rows_give_zero(lse2 * _LOG2E, HAS_MASK)
        s = _dkdv_scores(k, q, DOT_PRECISION, BY_QUERY) * scale_log2
        if EDGE:
            keep = _along_keys(n_valid, BY_QUERY) & _along_queries(m_valid, BY_QUERY)
            if IS_CAUSAL:
                keep = keep & (_along_keys(offs_n, BY_QUERY) <= _along_queries(rows, BY_QUERY))
        else:  # key rows past the segment have their own garbage, never stored
            keep = _along_keys(n_valid, BY_QUERY)  # (the mask's loads only)
        if APPLY_MASK:
            if MASK_PER_QUERY:
                q_rows = row0 - q_off + rows * rate
                s += _mask_bias(mask_keys + _along_queries(q_rows.to(tl.int64) * smq, BY_QUERY),
                                keep, MASK_BOOL)
            else:
                s += key_bias
        if EDGE:
            p = _probs(s, _along_queries(lse2, BY_QUERY), keep, HAS_MASK and not MASK_BOOL)
        else:
            p = _weights(s, _along_queries(lse2, BY_QUERY), HAS_MASK and not MASK_BOOL)
        dk, dv = _dkdv_products(dk, dv, p, q, v, do, row_delta, DOT_PRECISION, BY_QUERY)
    return dk, dv


@triton.jit
def _query_blocks(pid_n, n_rows, first, q_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, QUERY_TAIL: tl.constexpr):
    """The query blocks a dk/dv program of key block ``pid_n`` walks, the query rows
    ``[lo, q_end)`` cut into whole blocks (every row a query that sees every key of the block)
    and edge blocks: (lo, whole blocks' start, their count, edge blocks from lo, edge blocks'
    start after the whole ones, edge count). BLOCK_N is a multiple of BLOCK_M, so a causal key
    block's diagonal covers whole query blocks."""
    # Causal: query rows before this key block see none of it; start on a BLOCK_M boundary.
    lo = pid_n * BLOCK_N if IS_CAUSAL else 0
    whole_lo = lo + BLOCK_N if IS_CAUSAL else lo  # rows from here see the whole key block
    if QUERY_TAIL:  # nor do rows before the first query
        lo = tl.maximum(lo, (first // BLOCK_M) * BLOCK_M)
        whole_lo = tl.maximum(whole_lo, (first + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    whole_hi = (q_end // BLOCK_M) * BLOCK_M
    end = (q_end + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    head_end = tl.minimum(whole_lo, end)
    tail = tl.maximum(whole_hi, head_end)
    n_head = tl.maximum(head_end - lo, 0) // BLOCK_M
    n_whole = tl.maximum(whole_hi - whole_lo, 0) // BLOCK_M
    return lo, whole_lo, n_whole, n_head, tail, n_head + (end - tail) // BLOCK_M


@_jit
def dilated_attention_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, DK, DV, Mask, Counts,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sgb, sgh, sgn, sgd, slb, slh, sln, smb, smh, smq, smk, scb, sch,
    N, NQ, num_heads, num_kv_heads, kv_lo, kv_count, num_offsets, head_lo, head_count, kv_group,
    seg_len, rate, fixed_offset, scale_log2, rows_bucket, lo1, w1, r1, o1, lo2, w2, r2, o2,
    lo3, w3, r3, o3,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr, PARTS: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr, QUERY_TAIL: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    SPAN_FILTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BY_QUERY: tl.constexpr,
):
    """This launch's share of dk, dv (added, or written unless ACCUMULATE, as for dq) for one
    block of key rows of one (kv head, offset); the
    program sums over the query heads of the kv head's GQA group that use this offset, so no
    two programs write the same rows. The grid covers the kv heads ``[kv_lo, kv_lo + kv_count)``
    of the launch's query heads and (``QUERY_TAIL``) only the segments holding queries; the
    caller zeroes DK/DV for the rest. DK/DV are contiguous [B, Hkv, N, D(v)]. With several
    head_groups parts (``_part_of``; the launcher groups them only where every kv head's query
    heads lie in one part) a kv head takes its query heads' config."""
    scale_log2 = tl.cast(scale_log2, tl.float32)
    pid_n = tl.program_id(0)
    pid = tl.program_id(2)
    b = pid // (kv_count * num_offsets)
    kvh = kv_lo + (pid // num_offsets) % kv_count
    seg_len, rate, fixed_offset = _part_of(kvh * kv_group, seg_len, rate, fixed_offset, lo1, w1, r1,
                                           o1, lo2, w2, r2, o2, lo3, w3, r3, o3, PARTS)
    seg, q_off = _segment_of(tl.program_id(1), N, NQ, seg_len, QUERY_TAIL)
    offset = fixed_offset if fixed_offset >= 0 else pid % num_offsets
    row0, n_rows = _segment_rows(seg, seg_len, N, offset, rate)
    if pid_n * BLOCK_N >= n_rows:
        return
    if ACCUMULATE and fixed_offset < 0:
        # No query head of this kv head in the launch uses this offset (mixture: one head per
        # kv head without GQA, so rate - 1 of every rate programs): nothing to add. The first
        # such head at or after the group's first head in the launch, ``a``, is past its last.
        a = tl.maximum(kvh * kv_group, head_lo)
        if a + (offset - a % rate + rate) % rate >= tl.minimum((kvh + 1) * kv_group,
                                                               head_lo + head_count):
            return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    n_valid = offs_n < n_rows
    pos_n = row0 + offs_n * rate
    k = tl.load(K + b * skb + kvh * skh + pos_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_valid[:, None], other=0.0)
    v = tl.load(V + b * svb + kvh * svh + pos_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=n_valid[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], tl.float32)
    first = _first_query_row(row0, q_off, rate) if QUERY_TAIL else 0

    q_end = n_rows
    if SPAN_FILTER != 0:
        # Key padding the same for every head (the launcher checks), in two launches as in the
        # forward: the first does this key block's gradient where the mask keeps all of it
        # (else writes 0), the second adds it where the mask keeps a part.
        span = _key_span_state(Counts, b, kvh, scb, sch, N, row0, pid_n * BLOCK_N,
                               tl.minimum((pid_n + 1) * BLOCK_N, n_rows), rate)
        if SPAN_FILTER == 1:
            q_end = tl.where(span == _SPAN_NEUTRAL, n_rows, 0)
        else:
            if span != _SPAN_MIXED:
                return
    lo, whole_lo, n_whole, n_head, tail, n_edge = _query_blocks(
        pid_n, n_rows, first, q_end, BLOCK_M, BLOCK_N, IS_CAUSAL, QUERY_TAIL)

    for g in range(0, kv_group):
        h = kvh * kv_group + g
        in_launch = (h >= head_lo) & (h < head_lo + head_count)
        if in_launch & ((fixed_offset >= 0) | (h % rate == offset)):
            q_base = Q + b * sqb + h * sqh + (row0 - q_off) * sqn
            do_base = dOut + b * sgb + h * sgh + (row0 - q_off) * sgn
            l_base = Lse + b * slb + h * slh + (row0 - q_off) * sln
            d_base = Delta + (b * num_heads + h) * NQ + (row0 - q_off)
            mask_keys = _mask_base(Mask, b, h, smb, smh) + _along_keys(pos_n * smk, BY_QUERY)
            for edge in tl.static_range(2):  # the whole blocks, then the edge ones
                dk, dv = _dkdv_queries(
                    dk, dv, k, v, q_base, do_base, l_base, d_base, mask_keys, sqn, sqd, sgn, sgd,
                    sln, smq, offs_m, offs_n, offs_d, offs_dv, n_valid, row0, q_off, first,
                    lo if edge else whole_lo, n_head, tail, n_edge if edge else n_whole, n_rows,
                    rate, scale_log2, IS_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION,
                    QUERY_TAIL=QUERY_TAIL, HAS_MASK=HAS_MASK,
                    APPLY_MASK=HAS_MASK and SPAN_FILTER != 1, MASK_BOOL=MASK_BOOL,
                    MASK_PER_QUERY=MASK_PER_QUERY, EDGE=edge == 1, BY_QUERY=BY_QUERY,
                    BLOCK_M=BLOCK_M)

    kv_row = (b * num_kv_heads + kvh) * N + pos_n
    dk_ptrs = DK + kv_row[:, None] * HEAD_DIM + offs_d[None, :]
    dv_ptrs = DV + kv_row[:, None] * HEAD_DIM_V + offs_dv[None, :]
    dk = dk * (scale_log2 * _LN2)
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=n_valid[:, None], other=0.0)
        dv += tl.load(dv_ptrs, mask=n_valid[:, None], other=0.0)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


def _tuned(name, kernel, configs, key, restore_value):
    tuned(name, kernel, configs, _TUNE_KEY + [key], restore_value)
    return name


# The registered names of (16-bit inputs, float32 inputs) variants of each tuned kernel.
_FWD = (
    _tuned("dilated_fwd", dilated_attention_fwd_kernel, _FWD_CONFIGS, "MERGE", ["Out", "Lse"]),
    _tuned("dilated_fwd_fp32", dilated_attention_fwd_kernel, _FWD_CONFIGS_FP32, "MERGE",
           ["Out", "Lse"]),
)
_DQ = (
    _tuned("dilated_bwd_dq", dilated_attention_bwd_dq_kernel, _DQ_CONFIGS, "ACCUMULATE", ["DQ"]),
    _tuned("dilated_bwd_dq_fp32", dilated_attention_bwd_dq_kernel, _DQ_CONFIGS_FP32, "ACCUMULATE",
           ["DQ"]),
)
_DKDV = (
    _tuned("dilated_bwd_dkdv", dilated_attention_bwd_dkdv_kernel, _DKDV_CONFIGS, "ACCUMULATE",
           ["DK", "DV"]),
    _tuned("dilated_bwd_dkdv_fp32", dilated_attention_bwd_dkdv_kernel, _DKDV_CONFIGS_FP32,
           "ACCUMULATE", ["DK", "DV"]),
)


# --- launchers --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: config ``(segment_length, rate)`` over query heads
    ``[head_lo, head_lo + head_count)``; ``fixed_offset`` -1 means offset ``h mod rate``."""

    segment_length: int
    rate: int
    head_lo: int
    head_count: int
    fixed_offset: int

    def covers_every_row(self, num_heads: int) -> bool:
        """Whether this launch writes every query row: a rate-1 config over every head. A
        Python bool even for a symbolic ``num_heads`` (torch.compile with dynamic shapes), since
        the launchers sort on it and Python cannot order a bool against a ``SymBool``."""
        return self.rate == 1 and bool(self.head_count == num_heads)


def plan_launches(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, num_heads: int
) -> list[Launch]:
    """The launches of one call. Mixture: one per config, every head; the first config with
    rate 1 (if any) goes first, since it covers every row and the backward's first launch can
    then write without reading (the forward moves it last instead: ``forward``).
    head_groups: one per group (``_GroupedLaunch`` runs up to four of them in one launch)."""
    if mode == "mixture":
        launches = [Launch(w, r, 0, num_heads, -1) for w, r in zip(segment_lengths, dilation_rates)]
        launches.sort(key=lambda launch: launch.rate != 1)  # stable: keeps the spec's order otherwise
        return launches
    return [
        Launch(p.segment_length, p.dilation_rate, p.heads.start, p.heads.stop - p.heads.start, p.offset)
        for p in head_parts(segment_lengths, dilation_rates, mode, num_heads)
    ]


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels run this call (else the PyTorch implementation does): CUDA tensors
    of float16/bfloat16/float32 with head dims in ``SUPPORTED_HEAD_DIMS``. (The launchers
    also run on CPU tensors under ``TRITON_INTERPRET=1``; the op never sends them there.)"""
    return (
        q.is_cuda
        and q.dtype in SUPPORTED_DTYPES
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and v.shape[-1] in SUPPORTED_HEAD_DIMS
    )


def _cdiv(a, b):
    """ceil(a / b) for ints and SymInts (``triton.cdiv`` costs a few microseconds a call, and
    the launchers call it on every launch)."""
    return (a + b - 1) // b


def _rows_bucket(launch: Launch) -> int:
    return 1 << (_cdiv(launch.segment_length, launch.rate) - 1).bit_length()  # next power of 2


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Where one launch's programs go on a call with ``Nq`` queries and ``Nk`` keys."""

    seg_len: int  # effective segment length min(w, Nk)
    num_segments: int  # segments holding at least one query position (the last ones)
    max_rows: int  # most dilated rows a segment has
    query_rows: int  # most dilated query rows a segment has
    query_tail: bool  # Nq < Nk

    @staticmethod
    def of(launch: Launch, seq_q, seq_k) -> _Geometry:
        w = torch.sym_min(launch.segment_length, seq_k)
        max_rows = (w + launch.rate - 1) // launch.rate
        # Positions Nk - Nq .. Nk - 1 fall in ceil(Nq / r) dilated rows at most.
        query_rows = torch.sym_min(max_rows, (seq_q + launch.rate - 1) // launch.rate)
        num_segments = (seq_k + w - 1) // w - (seq_k - seq_q) // w
        return _Geometry(w, num_segments, max_rows, query_rows, seq_q != seq_k)

    def row_blocks(self, block: int):
        """Query programs along a segment's rows: their blocks stay aligned within the segment,
        so with fewer queries than keys the query rows may straddle one block more."""
        if not self.query_tail:
            return _cdiv(self.max_rows, block)
        return torch.sym_min(_cdiv(self.max_rows, block), _cdiv(self.query_rows, block) + 1)


# head_groups: up to this many head parts share one launch (``_part_of``).
_PARTS_PER_LAUNCH = 4


@dataclasses.dataclass(frozen=True)
class _GroupedLaunch:
    """One launch of a kernel over one or more head parts: a mixture config alone (its launches
    merge one after another), or up to ``_PARTS_PER_LAUNCH`` head_groups parts at once. Their
    heads are disjoint, so one launch has one writer per row, and one launch instead of one per
    group costs the host one launch's issue and the GPU one last wave instead of several (a
    part's work alone fills few waves)."""

    parts: tuple[Launch, ...]
    geometries: tuple[_Geometry, ...]

    @staticmethod
    def plan(launches: list[Launch], grouped: bool, seq_q, seq_k) -> list[_GroupedLaunch]:
        size = _PARTS_PER_LAUNCH if grouped else 1
        groups = [tuple(launches[i:i + size]) for i in range(0, len(launches), size)]
        return [_GroupedLaunch(g, tuple(_Geometry.of(p, seq_q, seq_k) for p in g)) for g in groups]

    @property
    def head_lo(self) -> int:
        return self.parts[0].head_lo

    @property
    def head_count(self) -> int:
        return self.parts[-1].head_lo + self.parts[-1].head_count - self.head_lo

    def args(self) -> tuple:
        """head_lo, head_count, seg_len, rate, fixed_offset, rows_bucket, then (first head,
        segment length, rate, offset) of parts 1-3 (zeros where absent)."""
        first, geo = self.parts[0], self.geometries[0]
        extra = []
        for part, g in zip(self.parts[1:], self.geometries[1:]):
            extra += [part.head_lo, g.seg_len, part.rate, part.fixed_offset]
        extra += [0] * (4 * (_PARTS_PER_LAUNCH - 1) - len(extra))
        return (self.head_lo, self.head_count, geo.seg_len, first.rate, first.fixed_offset,
                max(_rows_bucket(p) for p in self.parts), *extra)

    def _most(self, sizes):
        return functools.reduce(torch.sym_max, sizes)

    def grid(self, batch: int):
        """The query-side kernels' grid: row blocks and segments of the largest part, heads."""
        return lambda meta: (
            self._most([g.row_blocks(meta["BLOCK_M"]) for g in self.geometries]),
            self._most([g.num_segments for g in self.geometries]),
            batch * self.head_count,
        )

    def kv_heads(self, kv_group: int, num_heads: int) -> tuple[int, int, int]:
        """(first kv head, kv heads, offsets per kv head) of the dk/dv kernel's programs."""
        kv_lo = self.head_lo // kv_group
        kv_count = -(-(self.head_lo + self.head_count) // kv_group) - kv_lo
        first = self.parts[0]
        num_offsets = 1 if first.fixed_offset >= 0 else min(first.rate, num_heads)
        return kv_lo, kv_count, num_offsets

    def kv_grid(self, batch: int, kv_count: int, num_offsets: int):
        """The dk/dv kernel's grid: key blocks and segments of the largest part, kv heads."""
        return lambda meta: (
            self._most([_cdiv(g.max_rows, meta["BLOCK_N"]) for g in self.geometries]),
            self._most([g.num_segments for g in self.geometries]),
            batch * kv_count * num_offsets,
        )


def _key_counts(keys: torch.Tensor) -> torch.Tensor:
    """Prefix counts along the keys of a key-padding mask ``keys`` ``[B', H', Nk]``: plane 0 of
    ``[B', H', 2, Nk + 1]`` (int32) holds at ``p`` how many of the entries before position ``p``
    are not neutral (not True, not 0.0), plane 1 how many remove their pair (False; a float
    whose score term the kernels make -inf). A kernel reads a span's state from four of them
    instead of the span's entries. (Planes, not interleaved pairs: a scan along the last dim is
    fast, one along an outer dim of two columns is not.)"""
    if keys.dtype == torch.bool:
        nonneutral = removed = keys.logical_not()
    else:
        nonneutral = keys != 0
        removed = (keys.to(torch.float32) * LOG2E) == float("-inf")
    counts = torch.stack((nonneutral, removed), dim=2).to(torch.int32).cumsum(3, dtype=torch.int32)
    return torch.nn.functional.pad(counts, (1, 0))


def _mask_args(attn_mask, q):
    """(tensor, its four strides, key counts, their two strides, constexpr flags) that the
    kernels take for ``attn_mask``, a ``[B, Hq, Nq, Nk]`` view (stride 0 on broadcast dims) or
    None. Bool masks travel as uint8 views (one byte, 1 = keep). A mask constant along the
    queries (stride 0, or a single query) is read as one key vector per tile, and its prefix
    counts (``_key_counts``, per batch and head it varies over; None for other masks) let the
    launches skip the mask over keys that are all kept, and the work over keys that are all
    removed (``SPAN_FILTER``)."""
    tensor, strides, flags = mask_operand(attn_mask, q)
    if attn_mask is None or flags["MASK_PER_QUERY"]:
        return tensor, strides, None, (0, 0), flags
    keys = attn_mask[:, :, 0, :]
    varies = [keys.shape[d] != 1 and keys.stride(d) != 0 for d in (0, 1)]
    keys = keys[: None if varies[0] else 1, : None if varies[1] else 1]
    counts = _key_counts(keys)
    count_strides = tuple(counts.stride(d) if varies[d] else 0 for d in (0, 1))
    return tensor, strides, counts, count_strides, flags


def forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, attn_mask=None):
    """Dilated attention with the Triton kernels. Shapes as the op's: q [B, Hq, Nq, D],
    k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (Nq <= Nk: query i stands at position Nk - Nq + i),
    attn_mask None or a [B, Hq, Nq, Nk] view (bool or float) -> out [B, Hq, Nq, Dv] (q.dtype),
    lse [B, Hq, Nq] (fp32, -inf on rows that keep no key). The caller checks the inputs and
    ``supports``; ``scale`` is resolved."""
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k, head_dim_v = k.shape[2], v.shape[-1]
    num_heads = int(num_heads)  # symbolic under dynamic shapes: see ``backward``
    lse_shape = (batch, num_heads, seq_q)
    if seq_q == 0:
        return q.new_empty(batch, num_heads, 0, head_dim_v), q.new_empty(lse_shape, dtype=torch.float32)
    launches = plan_launches(segment_lengths, dilation_rates, mode, num_heads)
    merging = len(launches) > 1 and mode == "mixture"
    shape = (batch, num_heads, seq_q, head_dim_v)
    if merging:
        # Configs merge into an fp32 running result, each launch reading it where the lse says
        # an earlier one wrote. A rate-1 config over every head goes last: it reaches every row,
        # so it writes the final output in q's dtype as it merges (no cast pass afterwards);
        # without one the running result is cast at the end, rows no config reaches staying 0.
        # Stable: the spec's order otherwise.
        launches.sort(key=lambda launch: launch.covers_every_row(num_heads))
        final_writes = launches[-1].covers_every_row(num_heads)
        running = (torch.empty if final_writes else torch.zeros)(
            shape, device=q.device, dtype=torch.float32)
        direct = final_writes and q.dtype != torch.float32
        out = torch.empty(shape, device=q.device, dtype=q.dtype) if direct else running
        lse = torch.full(lse_shape, float("-inf"), device=q.device, dtype=torch.float32)
    else:  # one launch per row: each writes its rows in q's dtype
        every_row_covered = launches[0].covers_every_row(num_heads)
        alloc = torch.empty if every_row_covered else torch.zeros  # rows no launch writes: 0
        out = running = alloc(shape, device=q.device, dtype=q.dtype)
        lse = (torch.empty(lse_shape, device=q.device, dtype=torch.float32) if every_row_covered
               else torch.full(lse_shape, float("-inf"), device=q.device, dtype=torch.float32))
    mask, mask_strides, counts, count_strides, mask_flags = _mask_args(attn_mask, q)
    # Key padding: two launches per config (SPAN_FILTER); they share every row's one writer.
    filters = (0,) if counts is None else (1, 2)

    query_launches = _GroupedLaunch.plan(launches, mode == "head_groups", seq_q, seq_k)
    for index, group in enumerate(query_launches):
        head_lo, head_count, seg_len, rate, fixed_offset, rows_bucket, *parts = group.args()
        target = out if index == len(query_launches) - 1 else running
        for span_filter in filters:
            launch_tuned(
                _FWD[q.dtype == torch.float32], group.grid(batch),
                q, k, v, target, running, lse, mask, q if counts is None else counts,
                *q.stride(), *k.stride(), *v.stride(), *target.stride(), *lse.stride(), *mask_strides,
                *count_strides,
                seq_k, seq_q, head_lo, head_count, num_heads // k.shape[1],
                seg_len, rate, fixed_offset, scale * LOG2E, rows_bucket, *parts,
                HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, IS_CAUSAL=is_causal,
                PARTS=len(group.parts), MERGE=merging and index > 0,
                DOT_PRECISION=_dot_precision(q.dtype), QUERY_TAIL=seq_q != seq_k,
                SPAN_FILTER=span_filter, FUSED_SCALE=scale > 0, **mask_flags,
            )
    return out.to(q.dtype), lse


def backward(grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode,
             is_causal, scale, attn_mask=None):
    """dq, dk, dv with the Triton kernels (see ``forward`` for shapes). Key rows that no query
    attends (with Nq < Nk, or masked out) get zero gradients."""
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    # Under torch.compile with dynamic shapes the head counts may be symbolic; the launch plan
    # splits them into groups and offsets, so it takes them as they are (a guard on each).
    num_heads, num_kv_heads = int(num_heads), int(num_kv_heads)
    if seq_q == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    launches = plan_launches(segment_lengths, dilation_rates, mode, num_heads)
    precision = _dot_precision(q.dtype)
    query_tail = seq_q != seq_k

    delta = launch_delta(grad_out, out, lse, grad_lse)

    # Where every query head (every kv head's group) is in one launch, that launch writes the
    # gradient in its final dtype; else launches add into fp32 buffers, the first one writing
    # without reading when it covers every row (a rate-1 mixture config), and the sum is cast.
    kv_group = num_heads // num_kv_heads
    direct = len(launches) == 1 or mode == "head_groups"
    # head_groups: a kv head's gradient has one writer iff its query heads share one group.
    group_of = {h: i for i, launch in enumerate(launches)
                for h in range(launch.head_lo, launch.head_lo + launch.head_count)}
    kv_direct = len(launches) == 1 or mode == "head_groups" and all(
        len({group_of[h] for h in range(g * kv_group, (g + 1) * kv_group)}) == 1
        for g in range(num_kv_heads)
    )
    covered = launches[0].covers_every_row(num_heads)
    # With fewer queries than keys, key programs run only on segments holding queries: the
    # key rows before them keep the zeros they start with (the first launch still writes
    # without reading: nothing was added before it).
    kv_covered = covered and not query_tail

    def buffer(shape, dtype, is_direct, is_covered):
        alloc = torch.empty if is_covered else torch.zeros
        return alloc(shape, device=q.device, dtype=dtype if is_direct else torch.float32)

    dq = buffer(q.shape, q.dtype, direct, covered)
    dk = buffer(k.shape[:3] + (head_dim,), k.dtype, kv_direct, kv_covered)
    dv = buffer(k.shape[:3] + (head_dim_v,), v.dtype, kv_direct, kv_covered)
    mask, mask_strides, counts, count_strides, mask_flags = _mask_args(attn_mask, q)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(),
               *mask_strides, *count_strides)
    # Key padding: two launches each (SPAN_FILTER), the second adding to the first, which writes
    # 0 where it leaves the work to the second (so a gradient in its final dtype stays exact).
    # dk/dv take them only when the mask is the same for every head: a key block's programs sum
    # over the heads of a kv head's group, which would otherwise straddle the two launches.
    dq_filters = (0,) if counts is None else (1, 2)
    kv_filters = (1, 2) if counts is not None and count_strides[1] == 0 else (0,)
    if counts is None:
        counts = q
    common = dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, IS_CAUSAL=is_causal, DOT_PRECISION=precision,
        QUERY_TAIL=query_tail, **mask_flags,
    )
    for index, group in enumerate(_GroupedLaunch.plan(launches, mode == "head_groups", seq_q, seq_k)):
        head_lo, head_count, seg_len, rate, fixed_offset, rows_bucket, *parts = group.args()
        first_write = index == 0 and covered
        for span_filter in dq_filters:
            launch_tuned(
                _DQ[q.dtype == torch.float32], group.grid(batch),
                q, k, v, grad_out, lse, delta, dq, mask, counts, *strides,
                seq_k, seq_q, num_heads, head_lo, head_count, kv_group, seg_len,
                rate, fixed_offset, scale * LOG2E, rows_bucket, *parts,
                PARTS=len(group.parts), ACCUMULATE=span_filter == 2 or not (direct or first_write),
                SPAN_FILTER=span_filter, **common,
            )
    # dk/dv: head_groups parts share a launch only where every kv head's query heads lie in one
    # part (``kv_direct``): a key block's program sums its kv head's query heads.
    key_launches = _GroupedLaunch.plan(launches, mode == "head_groups" and kv_direct, seq_q, seq_k)
    for index, group in enumerate(key_launches):
        head_lo, head_count, seg_len, rate, fixed_offset, rows_bucket, *parts = group.args()
        kv_lo, kv_count, num_offsets = group.kv_heads(kv_group, num_heads)
        first_write = index == 0 and covered
        for span_filter in kv_filters:
            launch_tuned(
                _DKDV[q.dtype == torch.float32], group.kv_grid(batch, kv_count, num_offsets),
                q, k, v, grad_out, lse, delta, dk, dv, mask, counts, *strides,
                seq_k, seq_q, num_heads, num_kv_heads, kv_lo, kv_count, num_offsets,
                head_lo, head_count, kv_group, seg_len, rate, fixed_offset, scale * LOG2E,
                rows_bucket, *parts, PARTS=len(group.parts),
                ACCUMULATE=span_filter == 2 or not (kv_direct or first_write),
                SPAN_FILTER=span_filter, **common,
            )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
