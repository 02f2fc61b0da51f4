"""Triton kernels for dilated attention (forward, backward) and their launchers.

One launch attends one config (mixture: every head, offset ``h mod r``) or one head group
(head_groups: its heads, one fixed offset). A program takes ``BLOCK_M`` consecutive *dilated*
rows of one segment — positions ``s*w + o + j*r`` — and walks that segment's dilated key rows
through strided pointers: no gather copies, and the score tile is the dense tile of the
segment's dilated sub-problem, so no block is partly wasted the way a block mask would waste it.

Configs are merged by log-sum-exp inside the forward kernel: a launch reads the running fp32
output and lse of its rows, merges its own (already normalised) result and writes them back.
Launches of one call run one after another on one stream, so every row has one writer at a
time and the result is deterministic. The backward is FlashAttention-2 style with the *final*
lse and Delta = rowsum(dO * O) - dL/dlse: each config's share of dq (per query block) and of
dk/dv (per key block, summing the query heads of a GQA group inside the program) is computed
without atomics and added into fp32 accumulators, again one launch at a time.

Scores are kept in the log2 domain (``exp2``, scale premultiplied by log2(e)); the lse the op
returns is the natural-log one, converted at the boundary.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._pattern import head_parts

LOG2E = 1.4426950408889634
# Kernels read module globals only as constexprs.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)

#: Head dims the kernels are built for; other head dims use the PyTorch implementation.
SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False


def _launcher(kernel):
    """``wrap_triton(kernel)``: what torch.compile and torch.export trace a launch through.
    Under ``TRITON_INTERPRET=1`` (eager only: the interpreter does not mix with tracing) the
    kernel is launched as it is, because torch 2.11's ``wrap_triton`` cannot unwrap the
    interpreter's kernels (it expects a ``JITFunction`` under the autotuner)."""
    return kernel if _interpreting() else wrap_triton(kernel)


def _autotuning() -> bool:
    """``DILATED_COMPILE_AUTOTUNE=0`` keeps each kernel to its first (default) config: no
    tuning runs at the first call of each shape class, for a fast start (tests, debugging)."""
    return os.environ.get("DILATED_COMPILE_AUTOTUNE", "1") != "0"


def _configs(shapes: Sequence[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotuning candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, the default first;
    under the CPU interpreter one small config, since every program step costs milliseconds."""
    if _interpreting():
        shapes = [(16, 16, 1, 1)]
    elif not _autotuning():
        shapes = shapes[:1]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in shapes
    ]


# Keyed on the rows per segment (bucketed by the spec, not by N), the head dims, causality and
# the merge flag (the autotuner adds the tensors' dtypes): a new sequence length never retunes.
_TUNE_KEY = ["rows_bucket", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL"]

# Scalars that vary with the spec, the heads and N are not specialised on (== 1, % 16): each
# such value would compile another variant of every kernel. Strides stay specialised, since
# 16-byte alignment of the rows is what lets the loads vectorise.
_SCALARS = [
    "N", "head_lo", "head_count", "kv_group", "seg_len", "rate", "fixed_offset", "rows_bucket",
    "num_heads", "num_kv_heads", "kv_lo", "kv_count", "num_offsets",
]


def _jit(fn):
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in _SCALARS if n in names])


# BLOCK_M is a multiple of BLOCK_N in every forward config (the causal split relies on it).
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
# For dk/dv, BLOCK_N is the key block a program owns and BLOCK_M the query block it walks.
_DKDV_CONFIGS = _configs([
    (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 4),
])
_DKDV_CONFIGS_FP32 = _configs([(32, 64, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2)])


@triton.jit
def _segment_rows(seg, seg_len, N, offset, rate):
    """First position and number of dilated rows of segment ``seg`` for ``offset``."""
    seg_start = seg * seg_len
    this_len = tl.minimum(seg_len, N - seg_start)
    n_rows = (this_len - offset + rate - 1) // rate  # <= 0 when the offset falls past the end
    return seg_start + offset, n_rows


@triton.jit
def _query_program(N, head_lo, head_count, seg_len, rate, fixed_offset):
    """The query-side program's place, from its ids (block of dilated rows, segment, batch x
    head): (row block, batch, head, first position and number of the segment's dilated rows)."""
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // head_count
    h = head_lo + pid_bh % head_count
    offset = fixed_offset if fixed_offset >= 0 else h % rate
    row0, n_rows = _segment_rows(seg, seg_len, N, offset, rate)
    return pid_m, b, h, row0, n_rows


@_jit
def dilated_attention_fwd_kernel(
    Q, K, V, Out, Lse,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, son, sod, slb, slh, sln,
    N, head_lo, head_count, kv_group, seg_len, rate, fixed_offset, scale_log2, rows_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MERGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Inductor may pass the scale as a float64 scalar; keep the softmax state in float32.
    scale_log2 = tl.cast(scale_log2, tl.float32)
    pid_m, b, h, row0, n_rows = _query_program(N, head_lo, head_count, seg_len, rate, fixed_offset)
    if pid_m * BLOCK_M >= n_rows:
        return
    kvh = h // kv_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m_valid = offs_m < n_rows
    pos_m = row0 + offs_m * rate

    q = tl.load(Q + b * sqb + h * sqh + pos_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_valid[:, None], other=0.0)
    k_base = K + b * skb + kvh * skh + row0 * skn
    v_base = V + b * svb + kvh * svh + row0 * svn
    k_step = rate * skn
    v_step = rate * svn

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)

    # Key blocks that need no mask come first (BLOCK_M is a multiple of BLOCK_N, so the
    # causal diagonal starts on a block boundary), then the partly masked tail.
    if IS_CAUSAL:
        full_end = pid_m * BLOCK_M
        hi = tl.minimum((pid_m + 1) * BLOCK_M, n_rows)
    else:
        full_end = (n_rows // BLOCK_N) * BLOCK_N
        hi = n_rows
    for start_n in range(0, full_end, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[None, :] * k_step + offs_d[:, None] * skd)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * v_step + offs_dv[None, :] * svd)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    for start_n in range(full_end, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < n_rows
        k = tl.load(k_base + cols[None, :] * k_step + offs_d[:, None] * skd,
                    mask=n_valid[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        keep = n_valid[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        # Finite: every row keeps key 0 of its first block (itself or an earlier row).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * v_step + offs_dv[None, :] * svd,
                    mask=n_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i)
    o_ptrs = Out + b * sob + h * soh + pos_m[:, None] * son + offs_dv[None, :] * sod
    l_ptrs = Lse + b * slb + h * slh + pos_m * sln
    if MERGE:
        # Log-sum-exp merge with what earlier configs wrote for these rows (-inf: nothing yet).
        old2 = tl.load(l_ptrs, mask=m_valid, other=0.0) * _LOG2E
        new2 = tl.maximum(old2, lse2)
        new2 = new2 + tl.math.log2(tl.math.exp2(old2 - new2) + tl.math.exp2(lse2 - new2))
        old_out = tl.load(o_ptrs, mask=m_valid[:, None], other=0.0)
        out = old_out * tl.math.exp2(old2 - new2)[:, None] + out * tl.math.exp2(lse2 - new2)[:, None]
        lse2 = new2
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None])
    tl.store(l_ptrs, lse2 * _LN2, mask=m_valid)


@triton.jit
def dilated_attention_bwd_delta_kernel(
    Out, dOut, GradLse, Delta,
    sob, soh, son, sod, sgb, sgh, sgn, sgd, slb, slh, sln,
    H, N,
    HEAD_DIM_V: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Delta = rowsum(dO * O) - dL/dlse (fp32, contiguous [B, H, N])."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    valid = rows < N
    cols = tl.arange(0, HEAD_DIM_V)
    o = tl.load(Out + b * sob + h * soh + rows[:, None] * son + cols[None, :] * sod,
                mask=valid[:, None], other=0.0).to(tl.float32)
    do = tl.load(dOut + b * sgb + h * sgh + rows[:, None] * sgn + cols[None, :] * sgd,
                 mask=valid[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + b * slb + h * slh + rows * sln, mask=valid, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh * N + rows, delta, mask=valid)


@_jit
def dilated_attention_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sgb, sgh, sgn, sgd, slb, slh, sln,
    N, num_heads, head_lo, head_count, kv_group, seg_len, rate, fixed_offset, scale_log2, rows_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """This launch's share of dq, added into DQ (fp32) when ACCUMULATE, else written (DQ in
    q's dtype, or the fp32 buffer's first write). DQ is contiguous [B, Hq, N, D]."""
    # Inductor may pass the scale as a float64 scalar; keep the softmax state in float32.
    scale_log2 = tl.cast(scale_log2, tl.float32)
    pid_m, b, h, row0, n_rows = _query_program(N, head_lo, head_count, seg_len, rate, fixed_offset)
    if pid_m * BLOCK_M >= n_rows:
        return
    kvh = h // kv_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m_valid = offs_m < n_rows
    pos_m = row0 + offs_m * rate

    q = tl.load(Q + b * sqb + h * sqh + pos_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_valid[:, None], other=0.0)
    do = tl.load(dOut + b * sgb + h * sgh + pos_m[:, None] * sgn + offs_dv[None, :] * sgd,
                 mask=m_valid[:, None], other=0.0)
    lse2 = tl.load(Lse + b * slb + h * slh + pos_m * sln, mask=m_valid, other=0.0) * _LOG2E
    row_delta = tl.load(Delta + (b * num_heads + h) * N + pos_m, mask=m_valid, other=0.0)
    k_base = K + b * skb + kvh * skh + row0 * skn
    v_base = V + b * svb + kvh * svh + row0 * svn

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, n_rows) if IS_CAUSAL else n_rows
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < n_rows
        k = tl.load(k_base + cols[:, None] * (rate * skn) + offs_d[None, :] * skd,
                    mask=n_valid[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * (rate * svn) + offs_dv[None, :] * svd,
                    mask=n_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        keep = m_valid[:, None] & n_valid[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq_ptrs = DQ + (b * num_heads + h) * N * HEAD_DIM + pos_m[:, None] * HEAD_DIM + offs_d[None, :]
    dq = dq * (scale_log2 * _LN2)
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=m_valid[:, None], other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])


@_jit
def dilated_attention_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sgb, sgh, sgn, sgd, slb, slh, sln,
    N, num_heads, num_kv_heads, kv_lo, kv_count, num_offsets, head_lo, head_count, kv_group,
    seg_len, rate, fixed_offset, scale_log2, rows_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """This launch's share of dk, dv (added, or written unless ACCUMULATE, as for dq) for one
    block of key rows of one (kv head, offset); the
    program sums over the query heads of the kv head's GQA group that use this offset, so no
    two programs write the same rows. The grid covers the kv heads ``[kv_lo, kv_lo + kv_count)``
    of the launch's query heads. DK/DV are contiguous [B, Hkv, N, D(v)]."""
    scale_log2 = tl.cast(scale_log2, tl.float32)
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    pid = tl.program_id(2)
    b = pid // (kv_count * num_offsets)
    kvh = kv_lo + (pid // num_offsets) % kv_count
    offset = fixed_offset if fixed_offset >= 0 else pid % num_offsets
    row0, n_rows = _segment_rows(seg, seg_len, N, offset, rate)
    if pid_n * BLOCK_N >= n_rows:
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
    # Causal: query rows before this key block see none of it; start on a BLOCK_M boundary.
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0

    for g in range(0, kv_group):
        h = kvh * kv_group + g
        in_launch = (h >= head_lo) & (h < head_lo + head_count)
        if in_launch & ((fixed_offset >= 0) | (h % rate == offset)):
            q_base = Q + b * sqb + h * sqh + row0 * sqn
            do_base = dOut + b * sgb + h * sgh + row0 * sgn
            l_base = Lse + b * slb + h * slh + row0 * sln
            d_base = Delta + (b * num_heads + h) * N + row0
            for start_m in range(lo, n_rows, BLOCK_M):
                rows = start_m + offs_m
                m_valid = rows < n_rows
                q = tl.load(q_base + rows[:, None] * (rate * sqn) + offs_d[None, :] * sqd,
                            mask=m_valid[:, None], other=0.0)
                do = tl.load(do_base + rows[:, None] * (rate * sgn) + offs_dv[None, :] * sgd,
                             mask=m_valid[:, None], other=0.0)
                lse2 = tl.load(l_base + rows * (rate * sln), mask=m_valid, other=0.0) * _LOG2E
                row_delta = tl.load(d_base + rows * rate, mask=m_valid, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
                keep = n_valid[:, None] & m_valid[None, :]
                if IS_CAUSAL:
                    keep = keep & (offs_n[:, None] <= rows[None, :])
                p_t = tl.where(keep, tl.math.exp2(s_t - lse2[None, :]), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                ds_t = p_t * (dp_t - row_delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    kv_row = (b * num_kv_heads + kvh) * N + pos_n
    dk_ptrs = DK + kv_row[:, None] * HEAD_DIM + offs_d[None, :]
    dv_ptrs = DV + kv_row[:, None] * HEAD_DIM_V + offs_dv[None, :]
    dk = dk * (scale_log2 * _LN2)
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=n_valid[:, None], other=0.0)
        dv += tl.load(dv_ptrs, mask=n_valid[:, None], other=0.0)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


def _tuned(kernel, configs, key, restore_value):
    return triton.autotune(configs=configs, key=_TUNE_KEY + [key], restore_value=restore_value)(kernel)


# (16-bit inputs, float32 inputs) variants of each tuned kernel.
_FWD = (
    _tuned(dilated_attention_fwd_kernel, _FWD_CONFIGS, "MERGE", ["Out", "Lse"]),
    _tuned(dilated_attention_fwd_kernel, _FWD_CONFIGS_FP32, "MERGE", ["Out", "Lse"]),
)
_DQ = (
    _tuned(dilated_attention_bwd_dq_kernel, _DQ_CONFIGS, "ACCUMULATE", ["DQ"]),
    _tuned(dilated_attention_bwd_dq_kernel, _DQ_CONFIGS_FP32, "ACCUMULATE", ["DQ"]),
)
_DKDV = (
    _tuned(dilated_attention_bwd_dkdv_kernel, _DKDV_CONFIGS, "ACCUMULATE", ["DK", "DV"]),
    _tuned(dilated_attention_bwd_dkdv_kernel, _DKDV_CONFIGS_FP32, "ACCUMULATE", ["DK", "DV"]),
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


def plan_launches(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, num_heads: int
) -> list[Launch]:
    """The launches of one call. Mixture: one per config, every head; the first config with
    rate 1 (if any) goes first, since it covers every row and can write without merging."""
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


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products: TF32 would make the kernel ~1000x less
    # accurate than the PyTorch implementation it must match.
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows_bucket(launch: Launch) -> int:
    return triton.next_power_of_2(-(-launch.segment_length // launch.rate))


def _geometry(launch: Launch, seq_len):
    """(effective segment length, number of segments, max dilated rows per segment)."""
    w = torch.sym_min(launch.segment_length, seq_len)
    return w, (seq_len + w - 1) // w, (w + launch.rate - 1) // launch.rate


def forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale):
    """Dilated attention with the Triton kernels. Shapes as the op's: q [B, Hq, N, D],
    k [B, Hkv, N, D], v [B, Hkv, N, Dv] -> out [B, Hq, N, Dv] (q.dtype), lse [B, Hq, N] (fp32).
    The caller checks the inputs and ``supports``; ``scale`` is resolved."""
    batch, num_heads, seq_len, head_dim = q.shape
    head_dim_v = v.shape[-1]
    launches = plan_launches(segment_lengths, dilation_rates, mode, num_heads)
    every_row_covered = launches[0].rate == 1 and launches[0].head_count == num_heads
    merging = len(launches) > 1 and mode == "mixture"
    if merging:
        # fp32 running output; the first launch (rate 1) overwrites it, else start from zero.
        alloc = torch.empty if every_row_covered else torch.zeros
        acc = alloc(batch, num_heads, seq_len, head_dim_v, device=q.device, dtype=torch.float32)
    elif every_row_covered:
        acc = torch.empty(batch, num_heads, seq_len, head_dim_v, device=q.device, dtype=q.dtype)
    else:  # rows no launch writes are 0, with lse -inf
        acc = torch.zeros(batch, num_heads, seq_len, head_dim_v, device=q.device, dtype=q.dtype)
    lse_shape = (batch, num_heads, seq_len)
    if every_row_covered:
        lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    else:
        lse = torch.full(lse_shape, float("-inf"), device=q.device, dtype=torch.float32)

    for index, launch in enumerate(launches):
        w, num_segments, max_rows = _geometry(launch, seq_len)
        grid = lambda meta, rows=max_rows, segs=num_segments, heads=batch * launch.head_count: (
            triton.cdiv(rows, meta["BLOCK_M"]), segs, heads,
        )
        _launcher(_FWD[q.dtype == torch.float32])[grid](
            q, k, v, acc, lse,
            *q.stride(), *k.stride(), *v.stride(), *acc.stride(), *lse.stride(),
            seq_len, launch.head_lo, launch.head_count, num_heads // k.shape[1], w, launch.rate,
            launch.fixed_offset, scale * LOG2E, _rows_bucket(launch),
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, IS_CAUSAL=is_causal,
            MERGE=merging and (index > 0 or not every_row_covered),
            DOT_PRECISION=_dot_precision(q.dtype),
        )
    out = acc.to(q.dtype) if acc.dtype != q.dtype else acc
    return out, lse


def backward(grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode,
             is_causal, scale):
    """dq, dk, dv with the Triton kernels (see ``forward`` for shapes)."""
    batch, num_heads, seq_len, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[-1]
    launches = plan_launches(segment_lengths, dilation_rates, mode, num_heads)
    precision = _dot_precision(q.dtype)

    delta = torch.empty(batch, num_heads, seq_len, device=q.device, dtype=torch.float32)
    lse_grad = grad_lse if grad_lse is not None else lse  # any tensor; unread without grad_lse
    delta_block = 64 if not _interpreting() else 16
    _launcher(dilated_attention_bwd_delta_kernel)[
        (triton.cdiv(seq_len, delta_block), batch * num_heads)
    ](
        out, grad_out, lse_grad, delta,
        *out.stride(), *grad_out.stride(), *lse_grad.stride(),
        num_heads, seq_len,
        HEAD_DIM_V=head_dim_v, HAS_GRAD_LSE=grad_lse is not None, BLOCK=delta_block,
    )

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
    covered = launches[0].rate == 1 and launches[0].head_count == num_heads
    alloc = torch.empty if covered else torch.zeros

    def buffer(shape, dtype, is_direct):
        return alloc(shape, device=q.device, dtype=dtype if is_direct else torch.float32)

    dq = buffer(q.shape, q.dtype, direct)
    dk = buffer(k.shape[:3] + (head_dim,), k.dtype, kv_direct)
    dv = buffer(k.shape[:3] + (head_dim_v,), v.dtype, kv_direct)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride())
    for index, launch in enumerate(launches):
        w, num_segments, max_rows = _geometry(launch, seq_len)
        common = dict(
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, IS_CAUSAL=is_causal, DOT_PRECISION=precision,
        )
        first_write = index == 0 and covered
        grid = lambda meta, rows=max_rows, segs=num_segments, heads=batch * launch.head_count: (
            triton.cdiv(rows, meta["BLOCK_M"]), segs, heads,
        )
        _launcher(_DQ[q.dtype == torch.float32])[grid](
            q, k, v, grad_out, lse, delta, dq, *strides,
            seq_len, num_heads, launch.head_lo, launch.head_count, kv_group, w, launch.rate,
            launch.fixed_offset, scale * LOG2E, _rows_bucket(launch),
            ACCUMULATE=not (direct or first_write), **common,
        )
        num_offsets = 1 if launch.fixed_offset >= 0 else min(launch.rate, num_heads)
        kv_lo = launch.head_lo // kv_group
        kv_count = -(-(launch.head_lo + launch.head_count) // kv_group) - kv_lo
        kv_grid = lambda meta, rows=max_rows, segs=num_segments, progs=batch * kv_count * num_offsets: (
            triton.cdiv(rows, meta["BLOCK_N"]), segs, progs,
        )
        _launcher(_DKDV[q.dtype == torch.float32])[kv_grid](
            q, k, v, grad_out, lse, delta, dk, dv, *strides,
            seq_len, num_heads, num_kv_heads, kv_lo, kv_count, num_offsets, launch.head_lo,
            launch.head_count, kv_group, w, launch.rate, launch.fixed_offset, scale * LOG2E,
            _rows_bucket(launch),
            ACCUMULATE=not (kv_direct or first_write), **common,
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

