"""What the Triton attention families share: launching, tuning, and the ``@triton.jit`` helpers
of masks, empty rows and the backward's Delta.

Conventions every kernel follows: scores in the log2 domain (``exp2``, the scale premultiplied by
log2(e)), the lse converted to the natural log at the boundary; ``attn_mask`` read through the
strides of a ``[B, Hq, Nq, Nk]`` view (stride 0 on broadcast dims), bool masks as uint8 bytes
(1 = keep), float masks added to the scores; a row that keeps no key gives out 0, lse -inf and
zero gradients, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .tuning import select

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


def launch_tuned(name: str, grid, *args, **kwargs) -> None:
    """Launch the registered kernel ``name`` (``tuning.tuned``) on ``grid`` with the config
    ``tuning.select`` picks: the shipped one for this GPU, else the autotuner's."""
    kernel = select(name, args[0].device, args, kwargs)
    _launcher(kernel)[grid](*args, **kwargs)


#: The constexprs of a dk/dv candidate whose score tiles lie [queries, keys] (``_along_keys``),
#: and of the others, [keys, queries]; (name, value) pairs, so that candidates stay hashable.
BY_QUERY = (("BY_QUERY", True),)
BY_KEY = (("BY_QUERY", False),)


def _configs(shapes: Sequence[tuple], constexprs: tuple = ()) -> list[triton.Config]:
    """Autotuning candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, constexprs])``, the
    default first (what ``DILATED_COMPILE_AUTOTUNE=0`` launches: ``tuning.select``), each with
    ``constexprs`` under its own; under the CPU interpreter one small config, since every
    program step costs milliseconds. Every config names all of the kernel's tuned constexprs:
    Inductor compiles a kernel with its config's values and not with a signature's defaults."""
    if _interpreting():
        shapes = [(16, 16, 1, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, **dict(constexprs), **dict(*extra)},
                      num_warps=warps, num_stages=stages)
        for m, n, warps, stages, *extra in shapes
    ]


def jit_with_scalars(scalars: Sequence[str]):
    """``triton.jit`` that does not specialise on the arguments named in ``scalars`` (values that
    vary with the pattern, the heads and N: each ``== 1`` or ``% 16`` class of them would compile
    another variant of every kernel). Strides stay specialised, since 16-byte alignment of the
    rows is what lets the loads vectorise."""

    def jit(fn):
        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        return triton.jit(fn, do_not_specialize=[n for n in scalars if n in names])

    return jit


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products: TF32 would make the kernel ~1000x less
    # accurate than the PyTorch implementation it must match.
    return "ieee" if dtype == torch.float32 else "tf32"


def _bytes_of(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (1 = keep) with the same broadcast view. Converted on its stored
    entries only (the dims it broadcasts over are cut to one first), so a key-padding mask
    stays ``B * Nk`` bytes; a copy rather than ``view(torch.uint8)``, which Inductor cannot
    lower for a mask it computed itself."""
    stored = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    return stored.to(torch.uint8).expand(mask.shape)


def mask_operand(attn_mask, q):
    """(tensor, its four strides, constexpr flags) that the kernels take for ``attn_mask``, a
    ``[B, Hq, Nq, Nk]`` view (stride 0 on broadcast dims) or None (then ``q`` stands in, unread).
    Bool masks travel as uint8 views (one byte, 1 = keep). ``MASK_PER_QUERY`` is False for a
    mask constant along the queries (stride 0, or a single query): the kernels read it as one
    key vector per tile."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), dict(HAS_MASK=False, MASK_BOOL=False, MASK_PER_QUERY=False)
    is_bool = attn_mask.dtype == torch.bool
    tensor = _bytes_of(attn_mask) if is_bool else attn_mask
    per_query = attn_mask.shape[2] != 1 and attn_mask.stride(2) != 0
    return tensor, tensor.stride(), dict(HAS_MASK=True, MASK_BOOL=is_bool, MASK_PER_QUERY=per_query)


@triton.jit
def _load(ptrs, ok, CHECKED: tl.constexpr):
    """``tl.load(ptrs)``, reading only where ``ok`` (0 elsewhere) when ``CHECKED``: tiles that
    may reach past the rows check them; tiles known to lie inside load with no mask at all,
    which spares a compare and a predicate per loaded element."""
    if CHECKED:
        x = tl.load(ptrs, mask=ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _mask_base(Mask, b, h, smb, smh):
    """The mask's entries of batch ``b``, head ``h``. 64-bit offsets: a mask that varies along
    queries and keys can hold more than 2**31 entries, unlike q, k and v."""
    return Mask + b.to(tl.int64) * smb + h.to(tl.int64) * smh


@triton.jit
def _mask_tile(mask_rows, mask_keys, start_n, offs_n, n_rows, rate, smk, m_valid,
               MASK_PER_QUERY: tl.constexpr):
    """The raw mask entries of the key tile from key row ``start_n`` of a walk whose rows are
    ``rate`` positions apart (a dilated segment's rows; 1 for contiguous keys), 0 from row
    ``n_rows`` on: ``[BLOCK_M, BLOCK_N]``, or ``[1, BLOCK_N]`` for a mask constant along the
    queries. ``mask_rows``: the entries' pointers of the program's query rows (``[BLOCK_M, 1]``),
    or of batch and head alone; ``mask_keys``: the offsets of the first tile's keys."""
    ok = (start_n + offs_n < n_rows)[None, :]
    if MASK_PER_QUERY:
        ok = ok & m_valid[:, None]
    return tl.load(mask_rows + (start_n * rate * smk + mask_keys)[None, :], mask=ok, other=0)


@triton.jit
def _mask_bias(ptrs, ok, MASK_BOOL: tl.constexpr):
    """attn_mask's term of a score tile in the log2 domain, read at ``ptrs`` where ``ok``."""
    return _bias_of(tl.load(ptrs, mask=ok, other=0), MASK_BOOL)


@triton.jit
def _bias_of(m, MASK_BOOL: tl.constexpr):
    """Raw mask entries as a term of the scores in the log2 domain: 0 or -inf for a bool mask
    (True = keep), ``LOG2E * mask`` for a float one. (Float values below -FLT_MAX / LOG2E, such
    as finfo(float32).min, become -inf there: removed pairs.)"""
    if MASK_BOOL:
        bias = tl.where(m != 0, 0.0, float("-inf"))
    else:
        bias = m.to(tl.float32) * _LOG2E
    return bias


@triton.jit
def _finite_or_zero(x, GUARD: tl.constexpr):
    """``x`` with -inf replaced by 0 when ``GUARD``: the base of an ``exp2`` for rows that may
    have kept no key yet (with a mask), where ``exp2(-inf - -inf)`` would be NaN."""
    if GUARD:
        x = tl.where(x == float("-inf"), 0.0, x)
    return x


@triton.jit
def _scores(qk, scale_log2, RAW: tl.constexpr):
    """A forward's score tile from the products ``qk``: left raw when ``RAW`` (the scale is then
    applied inside ``_online_softmax``'s exponent), else in the log2 domain."""
    if not RAW:
        qk = qk * scale_log2
    return qk


@triton.jit
def _online_softmax_start(BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """(acc, l_i, m_i) of an online softmax that has seen no key yet."""
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    return acc, tl.zeros([BLOCK_M], tl.float32), tl.full([BLOCK_M], float("-inf"), tl.float32)


@triton.jit
def _online_softmax(acc, l_i, m_i, s, v, scale_log2, RAW: tl.constexpr, GUARD: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One key tile of the forward's online softmax: fold scores ``s`` ``[BLOCK_M, BLOCK_N]``
    (-inf where removed) and values ``v`` ``[BLOCK_N, Dv]`` into (acc, l_i, m_i).

    ``RAW``: ``s`` holds the raw products and the scale is applied in the exponent, one fused
    multiply-add per score instead of a multiply and a subtract: the score's elementwise work,
    not the matrix products, bounds a head-dim-64 tile on Hopper. Only for a positive scale
    (the row maximum commutes with it, and -inf stays -inf: the launchers pass
    ``FUSED_SCALE=scale > 0``) and scores with no mask term. ``GUARD``: rows may have kept no
    key yet (with a mask). The output is accumulated inside the product (``tl.dot``'s
    accumulator operand)."""
    row_max = tl.max(s, 1)
    if RAW:
        row_max = row_max * scale_log2
    m_new = tl.maximum(m_i, row_max)
    m_base = _finite_or_zero(m_new, GUARD)
    if RAW:
        p = tl.math.exp2(s * scale_log2 - m_base[:, None])
    else:
        p = tl.math.exp2(s - m_base[:, None])
    alpha = tl.math.exp2(m_i - m_base)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _empty_rows_give_zero(lse2, GUARD: tl.constexpr):
    """The backward's lse with -inf (a row that kept no key) replaced by +inf, so every
    ``exp2(s - lse)`` of that row is 0 rather than inf or NaN."""
    if GUARD:
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    return lse2


@triton.jit
def _weights(s, lse2, FLOAT_MASK: tl.constexpr):
    """The backward's attention weights ``exp2(s - lse)`` of a tile whose pairs are all kept
    (or removed by a -inf score). With a float mask, a row whose kept scores are all huge and
    negative (a mask of -1e9, say) has s and lse where float32 rounding can leave ``s - lse`` > 0
    and its exp2 inf; the exact value is <= 0."""
    x = s - lse2
    if FLOAT_MASK:
        x = tl.minimum(x, 0.0)
    return tl.math.exp2(x)


@triton.jit
def _probs(s, lse2, keep, FLOAT_MASK: tl.constexpr):
    """``_weights`` of the pairs in ``keep``, 0 elsewhere (a tile on an edge: past the rows, or
    on the causal diagonal)."""
    return tl.where(keep, _weights(s, lse2, FLOAT_MASK), 0.0)


@triton.jit
def _dq_products(dq, p, k, v, do, row_delta, DOT_PRECISION: tl.constexpr):
    """dq plus one [queries, keys] tile's share, from its weights ``p`` (``exp2(s - lse)``, 0
    where a pair is removed) and the query rows' ``row_delta``; dq still to be scaled."""
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - row_delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


# A dk/dv kernel holds a tile of keys and walks the queries. Its score tiles lie either way:
# [keys, queries] (the key rows are the products' M), or with ``BY_QUERY`` [queries, keys] (the
# query rows are: a query tile of 64 gives Hopper's wgmma a 64-wide N for the score products
# where [keys, queries] would give it 32). The tuning picks the orientation with the config;
# these place per-key and per-query vectors on a tile and run its products either way.


@triton.jit
def _along_keys(x, BY_QUERY: tl.constexpr):
    """A per-key vector placed on a dk/dv score tile."""
    # One return: the front end types every return statement, taken or not.
    if BY_QUERY:
        tile = x[None, :]
    else:
        tile = x[:, None]
    return tile


@triton.jit
def _along_queries(x, BY_QUERY: tl.constexpr):
    """A per-query vector placed on a dk/dv score tile."""
    if BY_QUERY:
        tile = x[:, None]
    else:
        tile = x[None, :]
    return tile


@triton.jit
def _dkdv_scores(k, q, DOT_PRECISION: tl.constexpr, BY_QUERY: tl.constexpr):
    """The raw scores of a dk/dv tile: k q^T, or q k^T with ``BY_QUERY``."""
    if BY_QUERY:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    return s


@triton.jit
def _dkdv_products(dk, dv, p, q, v, do, row_delta, DOT_PRECISION: tl.constexpr,
                   BY_QUERY: tl.constexpr):
    """dk, dv plus one score tile's share, from its weights ``p`` (``exp2(s - lse)``, 0 where a
    pair is removed) and the query rows' ``row_delta``; dk still to be scaled."""
    if BY_QUERY:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    else:
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = p * (dp - row_delta[None, :])
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_bwd_delta_kernel(
    Out, dOut, GradLse, Delta,
    sob, soh, son, sod, sgb, sgh, sgn, sgd, slb, slh, sln,
    H, N,
    HEAD_DIM_V: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Delta = rowsum(dO * O) - dL/dlse (fp32, contiguous [B, H, N]; N the query rows)."""
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


def launch_delta(grad_out, out, lse, grad_lse):
    """Delta ``[B, H, Nq]`` (fp32, contiguous) of ``out``, ``grad_out`` ``[B, H, Nq, Dv]`` and
    ``grad_lse`` ``[B, H, Nq]`` or None (then ``lse`` stands in, unread)."""
    batch, num_heads, seq_q, head_dim_v = out.shape
    delta = torch.empty(batch, num_heads, seq_q, device=out.device, dtype=torch.float32)
    lse_grad = grad_lse if grad_lse is not None else lse
    block = 64 if not _interpreting() else 16
    _launcher(attention_bwd_delta_kernel)[(triton.cdiv(seq_q, block), batch * num_heads)](
        out, grad_out, lse_grad, delta,
        *out.stride(), *grad_out.stride(), *lse_grad.stride(),
        num_heads, seq_q,
        HEAD_DIM_V=head_dim_v, HAS_GRAD_LSE=grad_lse is not None, BLOCK=block,
    )
    return delta
