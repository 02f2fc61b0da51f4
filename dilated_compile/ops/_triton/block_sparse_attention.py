"""Triton kernels for block-sparse attention (forward, backward) and their launchers.

The kernels walk the compact index of ``_block_layout.build_block_index``: for each query block
(index row ``r``, position block ``first_block + r``) its kept key blocks in ascending order, and
for the backward's key side, each key block's listed rows. Global ("dense") rows ``r <
dense_rows`` are not listed: their programs walk key blocks ``j = 0 .. kv_counts - 1``, and the
key-side programs add them to every key block's list themselves. An index of one head (``H' =
1``: no random blocks, no per-head layout) is read with a head stride of 0.

- Forward: a program takes ``BLOCK_M`` query positions of one query block of one (batch, head)
  and runs the online softmax over its kept key blocks, ``BLOCK_N`` keys at a time (both divide
  the block size). The key block of each step is one scalar load from the index, so the K/V
  tile addresses are a scalar offset from pointers computed once, and Triton's pipeliner
  prefetches them like a dense loop's. Only the row's last kept block can need element masks (the
  causal diagonal, since blocks ``j > i`` are not in the index, or the sequence's partial last
  block): one loop walks every step, and a branch uniform over the program masks that block's
  steps alone (two loops would drain the pipeline between them). A non-causal global row walks
  every key block: its walk is cut into parts run by programs of their own, merged by
  log-sum-exp in a second small kernel, so that no program runs much longer than the others.
- Backward (FlashAttention-2 style with the final lse and Delta = rowsum(dO * O) - dL/dlse): dq
  per query tile over the forward's walk; dk/dv per key tile over one walk of the rows that keep
  its block (the global rows, the listed rows, then the causal diagonal row, masked), summing the
  query heads of a GQA group inside the program. No atomics: every output row has one writer,
  so the backward is deterministic.

Queries are the last ``Nq`` positions (``Nq <= Nk``, query ``i`` at position ``Nk - Nq + i``):
a tile's rows before the first query or past the sequence are loaded as zeros and never stored.
``attn_mask`` (bool or float, a ``[B, Hq, Nq, Nk]`` view with stride 0 on broadcast dims) is
read through its strides at the kept pairs only; one constant along the queries (key padding)
as one key vector per tile. ``HAS_MASK``, ``IS_CAUSAL`` and the mask kinds are constexprs, so a
call without them compiles to kernels that hold none of their code.

Supported: CUDA tensors of float16/bfloat16/float32, head dims 32/64/128 (q/k and v each), block
sizes that are powers of two from 16 to 256 (tiles divide them). Other calls use the PyTorch
implementation (the op decides, with ``supports``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._block_layout import BlockIndex, cached_block_index
from ._common import LOG2E, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, jit_with_scalars, launch_delta
from ._common import _LN2, _LOG2E, _bias_of, _configs, _dot_precision, _empty_rows_give_zero
from ._common import _finite_or_zero, _interpreting, _launcher, _load, _mask_base, _mask_bias
from ._common import _mask_tile
from ._common import _online_softmax, _online_softmax_start, _probs, _scores, _weights, launch_tuned
from ._common import BY_KEY, BY_QUERY, _along_keys, _along_queries, _dkdv_products, _dkdv_scores
from ._common import _dq_products
from ._common import mask_operand
from .tuning import tuned

#: Block sizes the kernels tile (powers of two: every tile size divides them).
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)

# Values that vary with N, the heads and the pattern are not specialised on (see
# ``jit_with_scalars``).
_jit = jit_with_scalars([
    "N", "NQ", "batch_heads", "num_heads", "kv_group", "first_block", "dense_rows", "dense_splits",
    "dense_chunk", "batch_kv_heads", "num_kv_heads",
])

# Keyed on the head dims, causality and the mask's kind (the autotuner adds the tensors' dtypes;
# each block size has its own tuned kernels): a new sequence length never retunes.
_TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_MASK", "MASK_BOOL", "MASK_PER_QUERY"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages), the default first; tiles larger than the block size
# are cut to it. The defaults compile for sm_90 without spills for every supported head dim
# (dk/dv at 128 spills a few bytes): 128 x 64 query x key tiles on two warpgroups' wgmma, four
# stages so that the K/V tiles of the next two steps load while one computes. float32 inputs use
# exact FMA dots ("ieee"), whose operands live in registers: smaller tiles, 8 warps.
_FWD_SHAPES = ((128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4))
_FWD_SHAPES_FP32 = ((64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2))
_DQ_SHAPES = ((128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 3))
_DQ_SHAPES_FP32 = ((64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2))
# For dk/dv, BLOCK_N is the key tile a program owns and BLOCK_M the query tile it walks (the
# BY_QUERY ones with score tiles [queries, keys]: ``_along_keys``).
_DKDV_SHAPES = ((32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 5),
                (64, 64, 4, 3, BY_QUERY), (64, 64, 4, 4, BY_QUERY))
_DKDV_SHAPES_FP32 = ((16, 64, 8, 2), (16, 32, 4, 2), (16, 32, 8, 2))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """Whether the kernels run this call (else the PyTorch implementation does): CUDA tensors
    of float16/bfloat16/float32, head dims in ``SUPPORTED_HEAD_DIMS`` and a block size in
    ``SUPPORTED_BLOCK_SIZES``. (The launchers also run on CPU tensors under
    ``TRITON_INTERPRET=1``; the op never sends them there.)"""
    return (
        q.is_cuda
        and q.dtype in SUPPORTED_DTYPES
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and v.shape[-1] in SUPPORTED_HEAD_DIMS
        and block_size in SUPPORTED_BLOCK_SIZES
    )


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _query_program(batch_heads, num_heads, first_block, dense_rows, dense_splits,
                   BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query-side program's place: (batch, head, index row, first position of its tile, part
    of the row's walk). Each tile of a global row has ``dense_splits`` programs, one per part of
    its walk (merged by ``block_sparse_attention_fwd_combine_kernel``); every other tile has one,
    part 0. Program ids run over the (batch, head) pairs fastest and the global rows' tiles come
    first, so the longest programs start first rather than trail at the end of the grid."""
    pid = tl.program_id(0)
    bh = pid % batch_heads
    tile = pid // batch_heads
    tiles: tl.constexpr = BLOCK_SIZE // BLOCK_M
    split_tiles = dense_rows * tiles * dense_splits
    part = tl.where(tile < split_tiles, tile % dense_splits, 0)
    tile = tl.where(tile < split_tiles, tile // dense_splits, tile - split_tiles + dense_rows * tiles)
    row = tile // tiles
    start = (first_block + row) * BLOCK_SIZE + (tile % tiles) * BLOCK_M
    return bh // num_heads, bh % num_heads, row, start, part


@triton.jit
def _query_operands(
    Q, K, V, Mask, b, h, kvh, start, q_off, N, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh,
    svn, svd, smb, smh, smq, smk, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    K_TRANSPOSED: tl.constexpr,
):
    """What a query-side program reads before its walk: its positions ``start + offs_m``, which
    of them are queries, their rows in q (``[Nq]`` indices), the q tile (zeros outside the
    queries), the K and V pointers of key 0 (a step adds ``key0 * stride``: K as
    ``[D, BLOCK_N]`` when ``K_TRANSPOSED``, else ``[BLOCK_N, D]``; V as ``[BLOCK_N, Dv]``) and
    the mask's pointers of the rows and the first tile's key offsets; then ``offs_n``,
    ``offs_d``, ``offs_dv``."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_pos = start + offs_m
    m_valid = (q_pos >= q_off) & (q_pos < N)
    q_rows = q_pos - q_off
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + q_rows[:, None] * sqn
                + offs_d[None, :] * sqd, mask=m_valid[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    if K_TRANSPOSED:
        k_ptrs = k_base + offs_n[None, :] * skn + offs_d[:, None] * skd
    else:
        k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = (V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh + offs_n[:, None] * svn
              + offs_dv[None, :] * svd)
    mask_rows = _mask_base(Mask, b, h, smb, smh)
    if MASK_PER_QUERY:
        mask_rows += q_rows.to(tl.int64)[:, None] * smq
    return q_pos, m_valid, q_rows, q, k_ptrs, v_ptrs, mask_rows, offs_n * smk, offs_n, offs_d, offs_dv


@triton.jit
def _row_walk(KvIdx, KvCnt, Identity, h, row, start, sih, sir, sch, scr, first_block, dense_rows,
              N, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr):
    """The key walk of the query tile from position ``start`` of index row ``row``: (pointer to
    the row's key blocks, steps before its edge, all its steps); step ``it`` is key tile
    ``it % (BLOCK_SIZE // BLOCK_N)`` of the block in slot ``it // (BLOCK_SIZE // BLOCK_N)``.

    A global row walks ``j = slot``, read from ``Identity`` (``0 .. Mk - 1``) so that every
    row's step is the same scalar load. Only the row's last kept block can need element masks
    (its edge): it alone can hold keys past the sequence (the partial last block) or after a
    query (causal: the diagonal block, as later blocks are not kept). Of that block the walk
    takes the tiles that hold keys of the sequence and, on the diagonal, keys at or before the
    tile's last query."""
    count = tl.load(KvCnt + h * sch + row * scr)
    if row < dense_rows:
        idx = Identity
    else:
        idx = KvIdx + h * sih + row * sir
    last = tl.load(idx + tl.maximum(count - 1, 0), mask=count > 0, other=0)
    keys = tl.minimum(N - last * BLOCK_SIZE, BLOCK_SIZE)  # of the last block in the sequence
    edge = keys < BLOCK_SIZE
    if IS_CAUSAL:
        row_start = (first_block + row) * BLOCK_SIZE
        diagonal = last * BLOCK_SIZE == row_start
        edge = edge | diagonal
        keys = tl.where(diagonal, tl.minimum(keys, start - row_start + BLOCK_M), keys)
    tiles: tl.constexpr = BLOCK_SIZE // BLOCK_N
    full = tl.where(edge, count - 1, count) * tiles
    steps = tl.where(edge & (count > 0), full + tl.cdiv(keys, BLOCK_N), count * tiles)
    return idx, full, steps


@triton.jit
def _step_start(idx, it, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """First key position of walk step ``it``: tile ``it % (BLOCK_SIZE // BLOCK_N)`` of the key
    block in slot ``it // (BLOCK_SIZE // BLOCK_N)`` (one scalar load)."""
    tiles: tl.constexpr = BLOCK_SIZE // BLOCK_N
    return tl.load(idx + it // tiles) * BLOCK_SIZE + (it % tiles) * BLOCK_N


@triton.jit
def _edge_keep(keys, q_pos, N, IS_CAUSAL: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` pairs of a masked tile that attend: keys inside the sequence and,
    when causal, at or before the query."""
    keep = (keys < N)[None, :]
    if IS_CAUSAL:
        keep = keep & (keys[None, :] <= q_pos[:, None])
    return keep


@triton.jit
def _load_keys(k_ptrs, v_ptrs, key0, keys, N, skn, svn, K_TRANSPOSED: tl.constexpr,
               WHOLE_BLOCKS: tl.constexpr):
    """The K and V tiles of the keys ``key0 + offs_n`` (zeros past the sequence): K as
    ``[D, BLOCK_N]`` when ``K_TRANSPOSED`` (the forward's ``q @ k``), else ``[BLOCK_N, D]``; V as
    ``[BLOCK_N, Dv]``. The bound is checked on every tile (a compare per loaded element) so that
    every step of the walk is the same code for the pipeliner; with ``WHOLE_BLOCKS`` (the keys
    end on a block boundary: no tile reaches past them) it is not checked at all."""
    inside = keys < N
    if K_TRANSPOSED:
        k = _load(k_ptrs + key0 * skn, inside[None, :], not WHOLE_BLOCKS)
    else:
        k = _load(k_ptrs + key0 * skn, inside[:, None], not WHOLE_BLOCKS)
    return k, _load(v_ptrs + key0 * svn, inside[:, None], not WHOLE_BLOCKS)


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, key0, on_edge, q_pos, offs_n, m_valid, mask_rows, mask_keys,
    N, skn, svn, smk, scale_log2, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    RAW: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
):
    """One online-softmax step over the keys ``key0 + offs_n``. ``on_edge`` (the row's last
    block): apply the bounds and causal masks. A runtime branch, which the compiler turns into
    a select on every step (``benchmarks/kernel_sass.py``); the edge steps as a loop of their
    own measured slower on the H200 (each pipelined loop takes its own shared-memory buffers).
    Without causality and with ``WHOLE_BLOCKS`` no step is on an edge, and the branch goes.
    ``RAW``: see ``_online_softmax``."""
    keys = key0 + offs_n
    k, v = _load_keys(k_ptrs, v_ptrs, key0, keys, N, skn, svn, True, WHOLE_BLOCKS)
    s = _scores(tl.dot(q, k, input_precision=DOT_PRECISION), scale_log2, RAW)
    if IS_CAUSAL or not WHOLE_BLOCKS:
        if on_edge:
            s = tl.where(_edge_keep(keys, q_pos, N, IS_CAUSAL), s, float("-inf"))
    if HAS_MASK:
        s += _bias_of(_mask_tile(mask_rows, mask_keys, key0, offs_n, N, 1, smk, m_valid,
                                 MASK_PER_QUERY), MASK_BOOL)
    # Without a mask the maximum is finite: every query row keeps the first key of its row's
    # first block (the last block's first tile holds a key at or before every query). A mask
    # can empty a row, hence the guarded base.
    return _online_softmax(acc, l_i, m_i, s, v, scale_log2, RAW, HAS_MASK, DOT_PRECISION)


@_jit
def block_sparse_attention_fwd_kernel(
    Q, K, V, Out, Lse, Part, PartLse, Mask, KvIdx, KvCnt, Identity,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, son, sod, slb, slh, sln, smb, smh, smq, smk, sih, sir, sch, scr,
    N, NQ, batch_heads, num_heads, kv_group, first_block, dense_rows, dense_splits, dense_chunk,
    scale_log2,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr, SPLIT_DENSE: tl.constexpr,
    FUSED_SCALE: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Out ``[B, Hq, NQ, Dv]`` and Lse ``[B, Hq, NQ]`` (natural log, -inf on rows that keep no
    key) of one tile of ``BLOCK_M`` query positions. ``SPLIT_DENSE``: a global row's tile walks
    key slots ``[part * dense_chunk, (part + 1) * dense_chunk)`` only and writes its normalised
    output and log2 lse to Part ``[B * Hq, dense_rows * BLOCK_SIZE, dense_splits, Dv]`` and
    PartLse ``[B * Hq, dense_rows * BLOCK_SIZE, dense_splits]`` (fp32, rows from position
    ``first_block * BLOCK_SIZE``) instead, for the combine kernel."""
    # Inductor may pass the scale as a float64 scalar; keep the softmax state in float32.
    scale_log2 = tl.cast(scale_log2, tl.float32)
    b, h, row, start, part = _query_program(batch_heads, num_heads, first_block, dense_rows,
                                            dense_splits, BLOCK_SIZE, BLOCK_M)
    q_off = N - NQ
    if (start >= N) | (start + BLOCK_M <= q_off):  # no query in this tile
        return
    q_pos, m_valid, q_rows, q, k_ptrs, v_ptrs, mask_rows, mask_keys, offs_n, _, offs_dv = _query_operands(
        Q, K, V, Mask, b, h, h // kv_group, start, q_off, N, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb,
        svh, svn, svd, smb, smh, smq, smk, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_PER_QUERY, True)

    idx, full, steps = _row_walk(KvIdx, KvCnt, Identity, h, row, start, sih, sir, sch, scr,
                                 first_block, dense_rows, N, BLOCK_SIZE, BLOCK_M, BLOCK_N, IS_CAUSAL)
    chunk = dense_chunk * (BLOCK_SIZE // BLOCK_N)  # steps of a global row's part
    lo = part * chunk
    hi = tl.where(row < dense_rows, tl.minimum(steps, lo + chunk), steps)
    acc, l_i, m_i = _online_softmax_start(BLOCK_M, HEAD_DIM_V)
    for it in range(lo, hi):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, _step_start(idx, it, BLOCK_SIZE, BLOCK_N), it >= full,
            q_pos, offs_n, m_valid, mask_rows, mask_keys, N, skn, svn, smk, scale_log2,
            IS_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION, HAS_MASK=HAS_MASK,
            MASK_BOOL=MASK_BOOL, MASK_PER_QUERY=MASK_PER_QUERY,
            RAW=FUSED_SCALE and not HAS_MASK, WHOLE_BLOCKS=WHOLE_BLOCKS)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that kept no key: out 0, lse -inf + log2(1)
    out = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i)
    if SPLIT_DENSE & (row < dense_rows):
        part_rows = ((b * num_heads + h).to(tl.int64) * dense_rows * BLOCK_SIZE
                     + (q_pos - first_block * BLOCK_SIZE)) * dense_splits + part
        tl.store(Part + part_rows[:, None] * HEAD_DIM_V + offs_dv[None, :], out,
                 mask=m_valid[:, None])
        tl.store(PartLse + part_rows, lse2, mask=m_valid)
    else:
        tl.store(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + q_rows[:, None] * son
                 + offs_dv[None, :] * sod, out.to(Out.dtype.element_ty), mask=m_valid[:, None])
        tl.store(Lse + b.to(tl.int64) * slb + h.to(tl.int64) * slh + q_rows * sln, lse2 * _LN2,
                 mask=m_valid)


@triton.jit
def block_sparse_attention_fwd_combine_kernel(
    Part, PartLse, Out, Lse, sob, soh, son, sod, slb, slh, sln,
    N, NQ, num_heads, first_block, dense_rows, dense_splits,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK: tl.constexpr,
):
    """Out and Lse of ``BLOCK`` positions of the global rows, merged by log-sum-exp from the
    ``dense_splits`` parts the forward kernel wrote, in a fixed order (deterministic)."""
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # rows of the parts
    offs_dv = tl.arange(0, HEAD_DIM_V)
    pos = first_block * BLOCK_SIZE + offs
    valid = (offs < dense_rows * BLOCK_SIZE) & (pos >= N - NQ) & (pos < N)
    part_rows = (bh.to(tl.int64) * dense_rows * BLOCK_SIZE + offs) * dense_splits
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM_V], tl.float32)
    for s in range(0, dense_splits):
        lse2 = tl.load(PartLse + part_rows + s, mask=valid, other=float("-inf"))
        out = tl.load(Part + (part_rows + s)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                      mask=valid[:, None], other=0.0)
        m_new = tl.maximum(m, lse2)
        base = _finite_or_zero(m_new, True)  # no part of the row has kept a key yet
        alpha = tl.math.exp2(m - base)
        weight = tl.math.exp2(lse2 - base)
        acc = acc * alpha[:, None] + out * weight[:, None]
        total = total * alpha + weight
        m = m_new
    total = tl.where(total == 0.0, 1.0, total)  # a row that kept no key: out 0, lse -inf
    rows = pos - (N - NQ)
    tl.store(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None] * son
             + offs_dv[None, :] * sod, (acc / total[:, None]).to(Out.dtype.element_ty),
             mask=valid[:, None])
    tl.store(Lse + b.to(tl.int64) * slb + h.to(tl.int64) * slh + rows * sln,
             (m + tl.math.log2(total)) * _LN2, mask=valid)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, row_delta, k_ptrs, v_ptrs, key0, on_edge, q_pos, offs_n, m_valid, mask_rows,
    mask_keys, N, skn, svn, smk, scale_log2, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr,
):
    """dq of a query tile from the keys ``key0 + offs_n`` (``on_edge`` as in ``_fwd_tile``).
    Rows outside the queries get weights without a check: a dq row depends on its own row's
    weights only, and theirs is never stored (a select per score spared)."""
    keys = key0 + offs_n
    k, v = _load_keys(k_ptrs, v_ptrs, key0, keys, N, skn, svn, False, WHOLE_BLOCKS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if HAS_MASK:
        s += _bias_of(_mask_tile(mask_rows, mask_keys, key0, offs_n, N, 1, smk, m_valid,
                                 MASK_PER_QUERY), MASK_BOOL)
    p = _weights(s, lse2[:, None], HAS_MASK and not MASK_BOOL)
    if IS_CAUSAL or not WHOLE_BLOCKS:  # else no step is on an edge (``_fwd_tile``)
        if on_edge:
            p = tl.where(_edge_keep(keys, q_pos, N, IS_CAUSAL), p, 0.0)
    return _dq_products(dq, p, k, v, do, row_delta, DOT_PRECISION)


@_jit
def block_sparse_attention_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, DQ, Mask, KvIdx, KvCnt, Identity,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sgb, sgh, sgn, sgd, slb, slh, sln, smb, smh, smq, smk, sih, sir, sch, scr,
    N, NQ, batch_heads, num_heads, kv_group, first_block, dense_rows, scale_log2,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of one tile of query positions (DQ contiguous ``[B, Hq, NQ, D]``, q's dtype), over
    the forward's walk; 0 on rows that keep no key."""
    scale_log2 = tl.cast(scale_log2, tl.float32)
    b, h, row, start, _ = _query_program(batch_heads, num_heads, first_block, dense_rows, 1,
                                         BLOCK_SIZE, BLOCK_M)
    q_off = N - NQ
    if (start >= N) | (start + BLOCK_M <= q_off):
        return
    (q_pos, m_valid, q_rows, q, k_ptrs, v_ptrs, mask_rows, mask_keys, offs_n, offs_d,
     offs_dv) = _query_operands(
        Q, K, V, Mask, b, h, h // kv_group, start, q_off, N, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb,
        svh, svn, svd, smb, smh, smq, smk, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_PER_QUERY, False)
    do = tl.load(dOut + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + q_rows[:, None] * sgn
                 + offs_dv[None, :] * sgd, mask=m_valid[:, None], other=0.0)
    lse2 = tl.load(Lse + b.to(tl.int64) * slb + h.to(tl.int64) * slh + q_rows * sln,
                   mask=m_valid, other=0.0) * _LOG2E
    lse2 = _empty_rows_give_zero(lse2, HAS_MASK)
    row_delta = tl.load(Delta + (b * num_heads + h).to(tl.int64) * NQ + q_rows, mask=m_valid, other=0.0)

    idx, full, steps = _row_walk(KvIdx, KvCnt, Identity, h, row, start, sih, sir, sch, scr,
                                 first_block, dense_rows, N, BLOCK_SIZE, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for it in range(0, steps):
        dq = _dq_tile(
            dq, q, do, lse2, row_delta, k_ptrs, v_ptrs, _step_start(idx, it, BLOCK_SIZE, BLOCK_N),
            it >= full, q_pos, offs_n, m_valid, mask_rows, mask_keys, N, skn, svn, smk,
            scale_log2, IS_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION, HAS_MASK=HAS_MASK,
            MASK_BOOL=MASK_BOOL, MASK_PER_QUERY=MASK_PER_QUERY, WHOLE_BLOCKS=WHOLE_BLOCKS)

    dq = dq * (scale_log2 * _LN2)
    dq_ptrs = (DQ + (b * num_heads + h).to(tl.int64) * NQ * HEAD_DIM + q_rows[:, None] * HEAD_DIM
               + offs_d[None, :])
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_ptrs, do_ptrs, l_ptrs, d_ptrs, mask_keys, key_bias, pos0, on_diagonal, offs_m,
    offs_n, n_valid, q_off, N, sqn, sgn, sln, smq, scale_log2, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    MASK_PER_QUERY: tl.constexpr, BY_QUERY: tl.constexpr, QUERIES_WHOLE: tl.constexpr,
):
    """dk, dv of a program's key tile from the query positions ``pos0 + offs_m`` of one head
    (score tiles [keys, queries], or [queries, keys] with ``BY_QUERY``: ``_along_keys``).
    ``on_diagonal``: the causal mask (the key block's own query block), a runtime branch as
    ``_fwd_tile``'s edge. Rows outside the queries are loaded as zeros (q, dO, lse, Delta), so
    their contributions vanish; with ``QUERIES_WHOLE`` (the queries start and end on block
    boundaries) there are none, and the loads are not masked."""
    pos = pos0 + offs_m
    m_valid = (pos >= q_off) & (pos < N)
    rows = pos0 - q_off
    q = _load(q_ptrs + rows * sqn, m_valid[:, None], not QUERIES_WHOLE)
    do = _load(do_ptrs + rows * sgn, m_valid[:, None], not QUERIES_WHOLE)
    lse2 = _load(l_ptrs + rows * sln, m_valid, not QUERIES_WHOLE)
    row_delta = _load(d_ptrs + rows, m_valid, not QUERIES_WHOLE)
    lse2 = _empty_rows_give_zero(lse2 * _LOG2E, HAS_MASK)
    s = _dkdv_scores(k, q, DOT_PRECISION, BY_QUERY) * scale_log2
    if HAS_MASK:
        if MASK_PER_QUERY:
            s += _mask_bias(mask_keys + _along_queries((pos - q_off).to(tl.int64) * smq, BY_QUERY),
                            _along_keys(n_valid, BY_QUERY) & _along_queries(m_valid, BY_QUERY),
                            MASK_BOOL)
        else:
            s += key_bias
        p = _probs(s, _along_queries(lse2, BY_QUERY), _along_queries(m_valid, BY_QUERY),
                   not MASK_BOOL)
    else:
        p = tl.math.exp2(s - _along_queries(lse2, BY_QUERY))
    if IS_CAUSAL:
        if on_diagonal:
            p = tl.where(_along_keys(offs_n, BY_QUERY) <= _along_queries(pos, BY_QUERY), p, 0.0)
    dk, dv = _dkdv_products(dk, dv, p, q, v, do, row_delta, DOT_PRECISION, BY_QUERY)
    return dk, dv


@triton.jit
def _column_walk(QPtr, QIdx, h, sph, sxh, block, key_start, first_block, dense_rows,
                 BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The query walk of the key tile from position ``key_start`` of key block ``block``, for
    one query head: the global rows that keep the block, then its listed rows, then (causal)
    the diagonal row, whose pairs need the causal mask. Returns (pointer to the listed rows,
    first global row, steps over global rows, steps before the diagonal, all steps, diagonal
    row, its first query tile); each step is one ``BLOCK_M`` tile of a row."""
    tiles: tl.constexpr = BLOCK_SIZE // BLOCK_M
    listed_lo = tl.load(QPtr + h * sph + block)
    listed_hi = tl.load(QPtr + h * sph + block + 1)
    dense_lo = 0
    diag = block - first_block  # the index row of the key block's own position block
    diag_steps = 0
    if IS_CAUSAL:
        # Rows before the diagonal keep none of the block's keys; on it, the tiles before this
        # key tile see none of its keys either.
        first_listed = tl.load(QIdx + h * sxh + listed_lo, mask=listed_lo < listed_hi, other=-1)
        diag_dense = (diag >= 0) & (diag < dense_rows)
        diag_listed = (listed_lo < listed_hi) & (first_listed == diag)
        dense_lo = tl.maximum(tl.where(diag_dense, diag + 1, diag), 0)
        listed_lo = tl.where(diag_listed, listed_lo + 1, listed_lo)
        diag_tile = (key_start - block * BLOCK_SIZE) // BLOCK_M
        diag_steps = tl.where(diag_dense | diag_listed, tiles - diag_tile, 0)
    else:
        diag_tile = 0
    dense_steps = tl.maximum(dense_rows - dense_lo, 0) * tiles
    listed_end = dense_steps + (listed_hi - listed_lo) * tiles
    return (QIdx + h * sxh + listed_lo, dense_lo, dense_steps, listed_end, listed_end + diag_steps,
            diag, diag_tile)


@triton.jit
def _column_step(it, listed, dense_lo, dense_steps, listed_end, diag, diag_tile, Identity,
                 BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr):
    """First query position of step ``it`` of a ``_column_walk``: one scalar load, from the
    listed rows or (global and diagonal rows) from ``Identity``."""
    tiles: tl.constexpr = BLOCK_SIZE // BLOCK_M
    in_list = (it >= dense_steps) & (it < listed_end)
    slot = tl.where(it < dense_steps, dense_lo * tiles + it, diag * tiles + diag_tile + it - listed_end)
    slot = tl.where(in_list, it - dense_steps, slot)
    row = tl.load(tl.where(in_list, listed, Identity) + slot // tiles)
    return row * BLOCK_SIZE + (slot % tiles) * BLOCK_M


@_jit
def block_sparse_attention_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, DK, DV, Mask, QPtr, QIdx, Identity,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sgb, sgh, sgn, sgd, slb, slh, sln, smb, smh, smq, smk, sph, sxh,
    N, NQ, batch_kv_heads, num_heads, num_kv_heads, kv_group, first_block, dense_rows, scale_log2,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    QUERIES_WHOLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BY_QUERY: tl.constexpr,
):
    """dk, dv of one tile of ``BLOCK_N`` keys of one (batch, kv head), summed over the query
    heads of its GQA group (DK/DV contiguous ``[B, Hkv, N, D(v)]``, the inputs' dtypes; 0 on
    keys no query attends). Program ids run over the (batch, kv head) pairs fastest, so the
    global columns' tiles (kept by every row) start first."""
    scale_log2 = tl.cast(scale_log2, tl.float32)
    pid = tl.program_id(0)
    bkv = pid % batch_kv_heads
    tile = pid // batch_kv_heads
    b = bkv // num_kv_heads
    kvh = bkv % num_kv_heads
    block = tile // (BLOCK_SIZE // BLOCK_N)
    key_start = block * BLOCK_SIZE + (tile % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N
    if key_start >= N:
        return
    q_off = N - NQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = key_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    n_valid = offs_n < N
    k = tl.load(K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh + offs_n[:, None] * skn
                + offs_d[None, :] * skd, mask=n_valid[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh + offs_n[:, None] * svn
                + offs_dv[None, :] * svd, mask=n_valid[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], tl.float32)

    for g in range(0, kv_group):
        h = kvh * kv_group + g
        # Tiles of query 0 (position q_off); a step adds its first row's offset.
        q_ptrs = (Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqn
                  + offs_d[None, :] * sqd)
        do_ptrs = (dOut + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + offs_m[:, None] * sgn
                   + offs_dv[None, :] * sgd)
        l_ptrs = Lse + b.to(tl.int64) * slb + h.to(tl.int64) * slh + offs_m * sln
        d_ptrs = Delta + (b.to(tl.int64) * num_heads + h) * NQ + offs_m
        mask_keys = _mask_base(Mask, b, h, smb, smh) + _along_keys(offs_n * smk, BY_QUERY)
        key_bias = 0.0
        if HAS_MASK and not MASK_PER_QUERY:  # one key vector serves every query row
            key_bias = _mask_bias(mask_keys, _along_keys(n_valid, BY_QUERY), MASK_BOOL)
        listed, dense_lo, dense_steps, listed_end, steps, diag, diag_tile = _column_walk(
            QPtr, QIdx, h, sph, sxh, block, key_start, first_block, dense_rows, BLOCK_SIZE,
            BLOCK_M, IS_CAUSAL)
        for it in range(0, steps):
            pos0 = first_block * BLOCK_SIZE + _column_step(
                it, listed, dense_lo, dense_steps, listed_end, diag, diag_tile, Identity,
                BLOCK_SIZE, BLOCK_M)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_ptrs, do_ptrs, l_ptrs, d_ptrs, mask_keys, key_bias, pos0,
                it >= listed_end, offs_m, offs_n, n_valid, q_off, N, sqn, sgn, sln, smq,
                scale_log2, IS_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION, HAS_MASK=HAS_MASK,
                MASK_BOOL=MASK_BOOL, MASK_PER_QUERY=MASK_PER_QUERY, BY_QUERY=BY_QUERY,
                QUERIES_WHOLE=QUERIES_WHOLE)

    dk = dk * (scale_log2 * _LN2)
    kv_row = (b * num_kv_heads + kvh).to(tl.int64) * N + offs_n
    tl.store(DK + kv_row[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_valid[:, None])
    tl.store(DV + kv_row[:, None] * HEAD_DIM_V + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=n_valid[:, None])


# --- launchers --------------------------------------------------------------------------------


def _tuned(name: str, kernel, shapes: tuple, block_size: int, constexprs: tuple) -> str:
    """``kernel`` autotuned over ``shapes`` with tiles cut to ``block_size`` (a program's tiles
    must divide the block) and ``constexprs`` (``_configs``), registered as ``name``. No
    ``restore_value``: every kernel writes its outputs without reading them, so a tuning run
    leaves nothing to undo."""
    capped = dict.fromkeys(
        # Tiles cut below the default sizes are too small for 8 warps' worth of MMA work.
        (min(m, block_size), min(n, block_size), w if max(m, n) <= block_size else min(w, 4), s,
         *extra)
        for m, n, w, s, *extra in shapes
    )
    tuned(name, kernel, _configs(list(capped), constexprs), _TUNE_KEY)
    return name


def _variants(name: str, kernel, shapes: tuple, shapes_fp32: tuple, constexprs=()) -> dict:
    """The registered names of the tuned ``kernel`` per (float32 inputs, block size). Built once,
    here: the launchers run inside traced op bodies, which should find finished kernel objects."""
    return {(fp32, block_size): _tuned(f"{name}_bs{block_size}{'_fp32' if fp32 else ''}", kernel,
                                       shapes_fp32 if fp32 else shapes, block_size, constexprs)
            for fp32 in (False, True) for block_size in SUPPORTED_BLOCK_SIZES}


_FWD = _variants("block_sparse_fwd", block_sparse_attention_fwd_kernel, _FWD_SHAPES, _FWD_SHAPES_FP32)
_DQ = _variants("block_sparse_bwd_dq", block_sparse_attention_bwd_dq_kernel, _DQ_SHAPES, _DQ_SHAPES_FP32)
_DKDV = _variants("block_sparse_bwd_dkdv", block_sparse_attention_bwd_dkdv_kernel, _DKDV_SHAPES,
                  _DKDV_SHAPES_FP32, BY_KEY)


def _block_index(q, k, block_size, local_blocks, global_blocks, random_blocks, seed, layout,
                 is_causal, transpose=False) -> BlockIndex:
    return cached_block_index(
        q, block_size, local_blocks, global_blocks, random_blocks, seed, layout, q.shape[1],
        q.shape[2], k.shape[2], is_causal, transpose=transpose,
    )


def _head_stride(t: torch.Tensor) -> int:
    """Stride of an index tensor's head dim: 0 when one head's index serves every head."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def _identity(index: BlockIndex, device) -> torch.Tensor:
    """``0 .. Mk - 1`` (int32): the key blocks of a global row's walk and the rows of the
    key-side programs' global-row walk, read like any index row."""
    return torch.arange(index.num_key_blocks, device=device, dtype=torch.int32)


def _shared_args(q, k, block_size, is_causal, attn_mask):
    """The mask operand and the constexprs every kernel of a call takes."""
    mask, mask_strides, mask_flags = mask_operand(attn_mask, q)
    constexprs = dict(
        BLOCK_SIZE=block_size, HEAD_DIM=q.shape[-1], IS_CAUSAL=is_causal,
        DOT_PRECISION=_dot_precision(q.dtype), **mask_flags,
    )
    return mask, mask_strides, constexprs


def _whole_blocks(seq_k, block_size: int) -> bool:
    """Whether the keys end on a block boundary, so that no key tile reaches past them
    (``WHOLE_BLOCKS``). Read only from a concrete length: with a symbolic one (torch.compile with
    dynamic shapes) the kernels keep their bounds checks, rather than guard the compiled graph
    on the length's divisibility."""
    return isinstance(seq_k, int) and seq_k % block_size == 0


def _dense_split(index: BlockIndex, is_causal: bool):
    """(parts, key blocks per part) of a global row's walk. A non-causal global row walks all
    ``Mk`` key blocks while the other rows walk ``W``: cut into parts of at least ``2 W`` (and
    16) blocks, its programs are no longer than a few rows' and run beside them, instead of one
    program per tile whose walk alone sets the kernel's time (by 1.6x for BigBird on 16 heads).
    At most 64 parts, so the parts' buffer stays ``B * H * dense_rows * block_size * 64 * Dv``
    floats at any length. Causal global rows are the first blocks and walk only up to their
    own: one part, written in place."""
    if is_causal:
        return 1, index.num_key_blocks
    width = index.kv_indices.shape[-1]
    chunk = torch.sym_max(torch.sym_max(16, 2 * width), -(-index.num_key_blocks // 64))
    return -(-index.num_key_blocks // chunk), chunk


def forward(q, k, v, block_size, local_blocks, global_blocks, random_blocks, seed, layout,
            is_causal, scale, attn_mask=None):
    """Block-sparse attention with the Triton kernels. Shapes as the op's: q [B, Hq, Nq, D],
    k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (Nq <= Nk: query i stands at position Nk - Nq + i),
    layout None or bool [H or 1, >= Mk, >= Mk], attn_mask None or a [B, Hq, Nq, Nk] view (bool
    or float) -> out [B, Hq, Nq, Dv] (q.dtype), lse [B, Hq, Nq] (fp32, -inf and out 0 on rows
    that keep no key). The caller checks the inputs and ``supports``; ``scale`` is resolved."""
    batch, num_heads, seq_q, _ = q.shape
    num_kv_heads, seq_k, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(batch, num_heads, seq_q, head_dim_v, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, num_heads, seq_q, device=q.device, dtype=torch.float32)
    if seq_q == 0:
        return out, lse
    index = _block_index(q, k, block_size, local_blocks, global_blocks, random_blocks, seed,
                         layout, is_causal)
    mask, mask_strides, constexprs = _shared_args(q, k, block_size, is_causal, attn_mask)
    heads = batch * num_heads
    splits, chunk = _dense_split(index, is_causal)
    dense_positions = index.dense_rows * block_size
    part = torch.empty(heads, dense_positions, splits, head_dim_v, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(heads, dense_positions, splits, device=q.device, dtype=torch.float32)
    # Each tile of a global row has `splits` programs, every other tile one.
    grid = lambda meta: (  # noqa: E731
        (index.num_query_blocks + index.dense_rows * (splits - 1))
        * (block_size // meta["BLOCK_M"]) * heads,
    )
    launch_tuned(
        _FWD[q.dtype == torch.float32, block_size], grid,
        q, k, v, out, lse, part, part_lse, mask, index.kv_indices, index.kv_counts,
        _identity(index, q.device),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *mask_strides,
        _head_stride(index.kv_indices), index.kv_indices.stride(1),
        _head_stride(index.kv_counts), index.kv_counts.stride(1),
        seq_k, seq_q, heads, num_heads, num_heads // num_kv_heads, index.first_block,
        index.dense_rows, splits, chunk, scale * LOG2E, HEAD_DIM_V=head_dim_v,
        SPLIT_DENSE=not is_causal, FUSED_SCALE=scale > 0,
        WHOLE_BLOCKS=_whole_blocks(seq_k, block_size), **constexprs,
    )
    if not is_causal:
        rows_per_program = 64 if not _interpreting() else 16
        _launcher(block_sparse_attention_fwd_combine_kernel)[
            (triton.cdiv(dense_positions, rows_per_program), heads)
        ](
            part, part_lse, out, lse, *out.stride(), *lse.stride(),
            seq_k, seq_q, num_heads, index.first_block, index.dense_rows, splits,
            BLOCK_SIZE=block_size, HEAD_DIM_V=head_dim_v, BLOCK=rows_per_program,
        )
    return out, lse


def backward(grad_out, q, k, v, out, lse, grad_lse, block_size, local_blocks, global_blocks,
             random_blocks, seed, layout, is_causal, scale, attn_mask=None):
    """dq, dk, dv with the Triton kernels (see ``forward`` for shapes), in the inputs' dtypes;
    zero on the query rows and keys that no kept pair touches. ``grad_lse`` is dL/dlse or None."""
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    if seq_q == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    index = _block_index(q, k, block_size, local_blocks, global_blocks, random_blocks, seed,
                         layout, is_causal, transpose=True)
    identity = _identity(index, q.device)
    delta = launch_delta(grad_out, out, lse, grad_lse)
    mask, mask_strides, constexprs = _shared_args(q, k, block_size, is_causal, attn_mask)
    constexprs["HEAD_DIM_V"] = head_dim_v
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(),
               *mask_strides)
    kv_group = num_heads // num_kv_heads
    scale_log2 = scale * LOG2E

    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    heads = batch * num_heads
    grid = lambda meta: (index.num_query_blocks * (block_size // meta["BLOCK_M"]) * heads,)  # noqa: E731
    launch_tuned(
        _DQ[q.dtype == torch.float32, block_size], grid,
        q, k, v, grad_out, lse, delta, dq, mask, index.kv_indices, index.kv_counts, identity,
        *strides, _head_stride(index.kv_indices), index.kv_indices.stride(1),
        _head_stride(index.kv_counts), index.kv_counts.stride(1),
        seq_k, seq_q, heads, num_heads, kv_group, index.first_block, index.dense_rows, scale_log2,
        WHOLE_BLOCKS=_whole_blocks(seq_k, block_size), **constexprs,
    )

    dk = torch.empty(batch, num_kv_heads, seq_k, head_dim, device=q.device, dtype=k.dtype)
    dv = torch.empty(batch, num_kv_heads, seq_k, head_dim_v, device=q.device, dtype=v.dtype)
    kv_heads = batch * num_kv_heads
    kv_grid = lambda meta: (index.num_key_blocks * (block_size // meta["BLOCK_N"]) * kv_heads,)  # noqa: E731
    launch_tuned(
        _DKDV[q.dtype == torch.float32, block_size], kv_grid,
        q, k, v, grad_out, lse, delta, dk, dv, mask, index.q_ptr, index.q_indices, identity,
        *strides, _head_stride(index.q_ptr), _head_stride(index.q_indices),
        seq_k, seq_q, kv_heads, num_heads, num_kv_heads, kv_group, index.first_block,
        index.dense_rows, scale_log2, **constexprs,
        # Every query tile of the walk inside the queries: they start and end on block bounds.
        QUERIES_WHOLE=_whole_blocks(seq_k, block_size) and _whole_blocks(seq_k - seq_q, block_size),
    )
    return dq, dk, dv
