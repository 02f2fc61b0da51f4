"""``attn_mask`` and fewer queries than keys on ``torch.ops.dilated_compile.dilated_attention``
(CPU, the exact PyTorch implementation), against the float64 dense reference.

Masks (bool, True = keep; float, added to the scores) of every shape that broadcasts to
``[B, Hq, Nq, Nk]`` are applied on top of the pattern; queries are the last ``Nq <= Nk``
positions (the KV-cache convention), so decoding chunk by chunk gives the rows of the full
forward. Rows that the mask empties give out 0, lse -inf and zero gradients, never NaN. Forward
and gradients (dq, dk, dv, also through the lse) are compared with the reference's autograd.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from memory_probe import LargestAllocation
import torch.nn.functional as F

import dilated_compile
from dilated_compile.ops import dilated_attention_pytorch as pytorch_impl
from dilated_compile.ops._checks import expand_attn_mask
from dilated_compile.spec import DilatedSpec
from dilated_compile.testing import count_matrix, dense_reference

F64 = torch.float64
TOL = 1e-10
GRAD_TOL = 1e-9
BATCH = 2
MODES = ["mixture", "head_groups"]

# Every way a mask may broadcast to [B, Hq, Nq, Nk].
MASK_SHAPES = {
    "[Nk]": lambda b, h, nq, nk: (nk,),
    "[Nq,Nk]": lambda b, h, nq, nk: (nq, nk),
    "[1,1,Nq,Nk]": lambda b, h, nq, nk: (1, 1, nq, nk),
    "[B,1,1,Nk]": lambda b, h, nq, nk: (b, 1, 1, nk),
    "[B,Hq,Nq,Nk]": lambda b, h, nq, nk: (b, h, nq, nk),
    "[B,1,Nq,Nk]": lambda b, h, nq, nk: (b, 1, nq, nk),
}
# Specs whose segments divide none of the lengths drawn below; the last has sparse heads whose
# rows have no key in a short last segment.
SPECS = [
    ((4,), (1,)),
    ((5, 12), (1, 3)),
    ((3, 8, 20), (1, 2, 5)),
    ((16,), (4,)),
]
KV_LENGTHS = [1, 7, 13, 30]


def _op(q, k, v, spec: DilatedSpec, *, is_causal=False, scale=None, attn_mask=None):
    return torch.ops.dilated_compile.dilated_attention(
        q, k, v, list(spec.segment_lengths), list(spec.dilation_rates), spec.mode, is_causal,
        scale, attn_mask,
    )


def _reference(q, k, v, spec, *, is_causal=False, scale=None, attn_mask=None):
    return dense_reference(
        q, k, v, spec, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        return_lse=True, attn_mask=attn_mask,
    )


def _qkv(nq, nk, *, hq=4, hkv=2, d=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    return make(BATCH, hq, nq, d), make(BATCH, hkv, nk, d), make(BATCH, hkv, nk, dv)


def _mask(shape, kind: str, seed: int) -> torch.Tensor:
    """A random bool mask (about 70% kept) or float mask (N(0, 2), about 20% -inf)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < 0.7
    if kind == "bool":
        return keep
    values = 2 * torch.randn(shape, generator=g, dtype=F64)
    return torch.where(torch.rand(shape, generator=g) < 0.8, values, -math.inf)


def _loss(out, lse, seed):
    """A random linear functional of out and of the finite entries of lse."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=F64)
    gl = torch.randn(lse.shape, generator=g, dtype=F64)
    finite = torch.isfinite(lse.detach())
    return (out * go).sum() + (lse[finite] * gl[finite]).sum()


def _check(q, k, v, spec, *, is_causal=False, scale=None, attn_mask=None, seed=0):
    """Forward (out, lse, -inf rows included) and gradients of the op against the reference."""
    case = (
        f"q{tuple(q.shape)} k{tuple(k.shape)} {spec} is_causal={is_causal} mask="
        f"{None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype)}"
    )
    out, lse = _op(q, k, v, spec, is_causal=is_causal, scale=scale, attn_mask=attn_mask)
    ref_out, ref_lse = _reference(q, k, v, spec, is_causal=is_causal, scale=scale,
                                  attn_mask=attn_mask)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, case
    close = lambda a, b, tol, what: torch.testing.assert_close(  # noqa: E731
        a, b, atol=tol, rtol=tol, msg=lambda m: f"{what} [{case}]: {m}"
    )
    close(out, ref_out, TOL, "out")
    close(lse, ref_lse, TOL, "lse")  # -inf where the reference has -inf, exactly
    got = torch.autograd.grad(_loss(out, lse, seed), (q, k, v))
    want = torch.autograd.grad(_loss(ref_out, ref_lse, seed), (q, k, v))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), (name, case)
        close(g, w, GRAD_TOL, name)
    return out, lse


# --------------------------------------------------------------------------------------------
# Every mask shape, bool and float, both modes, random shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape_name", list(MASK_SHAPES))
def test_mask_shapes_against_the_reference(shape_name, kind, mode):
    rng = random.Random(f"{shape_name}-{kind}-{mode}")
    for trial in range(3):
        segments, rates = rng.choice(SPECS)
        spec = DilatedSpec(segments, rates, mode)
        nk = rng.choice(KV_LENGTHS)
        nq = rng.choice(sorted({nk, 1, max(1, nk // 2), rng.randint(1, nk)}))
        hq, hkv = rng.choice([(4, 4), (4, 2), (4, 1), (6, 3)])
        q, k, v = _qkv(nq, nk, hq=hq, hkv=hkv, seed=trial)
        mask = _mask(MASK_SHAPES[shape_name](BATCH, hq, nq, nk), kind, seed=trial)
        # The op (not SDPA) also takes is_causal with a mask: the pairs both keep.
        _check(q, k, v, spec, attn_mask=mask, scale=rng.choice([None, 0.4]),
               is_causal=trial == 1, seed=trial)


@pytest.mark.parametrize("mode", MODES)
def test_float_mask_in_float32(mode):
    """A float32 mask with float64 inputs (the ops take float32 or the inputs' dtype)."""
    spec = DilatedSpec((5, 12), (1, 3), mode)
    q, k, v = _qkv(9, 23, seed=1)
    mask = _mask((BATCH, 1, 9, 23), "float", seed=1).float()
    _check(q, k, v, spec, attn_mask=mask)


def test_bool_mask_equals_the_float_mask_it_stands_for():
    spec = DilatedSpec((4, 9), (1, 2))
    q, k, v = _qkv(11, 19, seed=2)
    keep = _mask((BATCH, 1, 1, 19), "bool", seed=2)
    bias = torch.zeros(keep.shape, dtype=F64).masked_fill(~keep, -math.inf)
    out_bool, lse_bool = _op(q, k, v, spec, attn_mask=keep)
    out_float, lse_float = _op(q, k, v, spec, attn_mask=bias)
    torch.testing.assert_close(out_bool, out_float, atol=0, rtol=0)
    torch.testing.assert_close(lse_bool, lse_float, atol=0, rtol=0)


def test_all_true_mask_changes_nothing():
    spec = DilatedSpec((3, 8, 20), (1, 2, 5))
    q, k, v = _qkv(13, 30, seed=3)
    plain = _op(q, k, v, spec)
    masked = _op(q, k, v, spec, attn_mask=torch.ones(30, dtype=torch.bool))
    zero_bias = _op(q, k, v, spec, attn_mask=torch.zeros(13, 30, dtype=F64))
    for got in (masked, zero_bias):
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# The pattern's causal, fewer queries than keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_fewer_queries_than_keys(mode, is_causal):
    """Nq < Nk, Nq = 1 included; causal is aligned to the query's position (bottom-right)."""
    for (segments, rates), nk in zip(SPECS, [30, 13, 29, 31]):
        spec = DilatedSpec(segments, rates, mode)
        for nq in (1, 2, nk // 2, nk - 1, nk):
            _check(*_qkv(nq, nk, seed=nq), spec, is_causal=is_causal, seed=nq)


def test_a_query_is_the_row_of_its_position():
    """Without causal a query's row depends only on its position, not on how many queries
    come along (the keys are the same)."""
    spec = DilatedSpec((5, 12), (1, 3))
    q, k, v = _qkv(20, 20, seed=4)
    out, lse = _op(q, k, v, spec)
    for nq in (1, 3, 8):
        part_out, part_lse = _op(q[:, :, -nq:], k, v, spec)
        torch.testing.assert_close(part_out, out[:, :, -nq:], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(part_lse, lse[:, :, -nq:], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["is_causal", "causal_mask"])
def test_chunk_decoding_gives_the_rows_of_the_full_forward(mode, how):
    """Prefill, then decode in chunks of 1, 3, 2, ... with a growing cache: each chunk's rows
    equal the full causal forward's (with a causal mask: the full mask's rows and keys)."""
    spec = DilatedSpec((4, 8, 16), (1, 2, 4), mode)
    n = 27
    q, k, v = _qkv(n, n, seed=5)
    padding = _mask((BATCH, 1, 1, n), "bool", seed=5)
    padding[..., 0] = True  # (every row keeps a key)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = (causal & padding) if how == "causal_mask" else None
    full_out, full_lse = _op(q, k, v, spec, is_causal=mask is None, attn_mask=mask)
    start = 0
    for size in (9, 1, 3, 2, 1, 5, 6):
        end = start + size
        chunk_mask = None if mask is None else mask[..., start:end, :end]
        out, lse = _op(q[:, :, start:end], k[:, :, :end], v[:, :, :end], spec,
                       is_causal=mask is None, attn_mask=chunk_mask)
        torch.testing.assert_close(out, full_out[:, :, start:end], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse, full_lse[:, :, start:end], atol=1e-12, rtol=1e-12)
        start = end
    assert start == n


@pytest.mark.parametrize("shape_name", ["[B,1,1,Nk]", "[Nq,Nk]"])
def test_decoding_with_a_mask(shape_name):
    spec = DilatedSpec((3, 8, 20), (1, 2, 5), "mixture")
    for nk in (1, 8, 21, 40):
        q, k, v = _qkv(1, nk, hkv=1, seed=nk)
        mask = _mask(MASK_SHAPES[shape_name](BATCH, 4, 1, nk), "float", seed=nk)
        _check(q, k, v, spec, attn_mask=mask, seed=nk)


def test_no_query_gives_an_empty_result():
    spec = DilatedSpec((4,), (2,))
    q, k, v = _qkv(0, 9, seed=6)
    out, lse = _op(q, k, v, spec, attn_mask=torch.ones(9, dtype=torch.bool))
    assert out.shape == (BATCH, 4, 0, 6) and lse.shape == (BATCH, 4, 0)


# --------------------------------------------------------------------------------------------
# Rows the mask empties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("nq", [1, 10])
def test_fully_masked_rows_give_zeros_and_zero_gradients(kind, nq):
    spec = DilatedSpec((4, 8), (1, 2))
    nk = 10
    q, k, v = _qkv(nq, nk, seed=7)
    keep = torch.ones(BATCH, 4, nq, nk, dtype=torch.bool)
    keep[0, :, 0] = False  # every head: the first query of batch 0 keeps no key
    keep[1, 2, -1] = False  # one head of batch 1: its last query
    keep[1, 3, :, -3:] = False  # one head of batch 1 drops the last three keys
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=F64).masked_fill(
        ~keep, -math.inf
    )
    _check(q, k, v, spec, attn_mask=mask, seed=7)
    out, lse = _op(q, k, v, spec, attn_mask=mask)
    empty = (count_matrix(spec, nk, 4, query_len=nq) > 0) & keep
    empty = ~empty.any(-1)  # [B, Hq, Nq]
    assert empty[0, :, 0].all() and empty[1, 2, -1]
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert torch.isfinite(lse[~empty]).all()
    dq, dk, dv = torch.autograd.grad(_loss(out, lse, seed=8), (q, k, v), retain_graph=True)
    assert (dq[empty] == 0).all()
    if nq > 1:  # kv head 1 serves query heads 2 and 3: head 2 still reads the last keys
        assert (dk[1, 1, -3:] != 0).any()
    dk_unused, dv_unused = torch.autograd.grad(
        _loss(out[1:, 3:], lse[1:, 3:], seed=9), (k, v), allow_unused=True
    )
    assert (dk_unused[1, 1, -3:] == 0).all() and (dv_unused[1, 1, -3:] == 0).all()


def test_every_pair_masked():
    spec = DilatedSpec((5, 12), (1, 3), "head_groups")
    q, k, v = _qkv(6, 11, seed=10)
    for mask in (torch.zeros(11, dtype=torch.bool), torch.full((6, 11), -math.inf)):
        out, lse = _op(q, k, v, spec, attn_mask=mask.to(F64) if mask.is_floating_point() else mask)
        assert (out == 0).all() and torch.isneginf(lse).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all((g == 0).all() for g in grads)


# --------------------------------------------------------------------------------------------
# Gradcheck, boundary errors, cost
# --------------------------------------------------------------------------------------------


def test_gradcheck_with_a_float_mask_and_fewer_queries():
    spec = DilatedSpec((3, 5), (1, 2))
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 3, 3, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(1, 1, 7, 3, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(1, 1, 7, 2, generator=g, dtype=F64, requires_grad=True)
    mask = _mask((1, 2, 3, 7), "float", seed=11)

    def fn(q, k, v):
        out, lse = _op(q, k, v, spec, attn_mask=mask)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_causal_with_a_mask_raises_at_the_sdpa_boundary_only():
    """SDPA refuses attn_mask with is_causal=True, and so do dilated(...) and the functional; the
    op keeps the pairs both keep (a module's causal attention with key padding needs no N x N)."""
    spec = DilatedSpec((4, 8), (1, 2))
    q, k, v = _qkv(9, 13)
    keep = torch.rand(2, 1, 1, 13, generator=torch.Generator().manual_seed(5)) > 0.3
    with pytest.raises(ValueError, match="is_causal"):
        dilated_compile.dilated_attention(q, k, v, spec, is_causal=True, attn_mask=keep,
                                          enable_gqa=True)
    with pytest.raises(ValueError, match="is_causal"), dilated_compile.dilated(spec):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, attn_mask=keep, enable_gqa=True)
    _check(q, k, v, spec, is_causal=True, attn_mask=keep)


def _forward_implementation(q, k, v, spec, mask):
    """The PyTorch forward itself, below the op's dispatch (so the mode sees its tensors)."""
    mask = expand_attn_mask(mask, q, k)
    args = (list(spec.segment_lengths), list(spec.dilation_rates), spec.mode, False, None, mask)
    return pytorch_impl.dilated_attention_pytorch._init_fn(q, k, v, *args)


def test_a_key_padding_mask_and_a_decoding_step_stay_cheap():
    """A [B, 1, 1, Nk] mask is read through stride-0 views (never [B, Hq, Nq, Nk]), and one
    query against a long cache touches one segment per config, not the cache."""
    spec = DilatedSpec((16, 64), (1, 4))
    n, heads, d = 4096, 4, 8
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    mask = torch.rand(1, 1, 1, n, generator=g) < 0.9
    with LargestAllocation(q, k, v, mask) as largest:
        _forward_implementation(q, k, v, spec, mask)
    assert largest.elements <= heads * n * 64  # scores: N * w per head; never N x N
    assert largest.elements < n * n // 16
    decode = q[:, :, -1:].clone()
    with LargestAllocation(decode, k, v, mask) as largest:
        out, _ = _forward_implementation(decode, k, v, spec, mask)
    assert largest.elements <= heads * 64 * d  # one segment's rows
    want = dense_reference(decode, k, v, spec, attn_mask=mask)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
