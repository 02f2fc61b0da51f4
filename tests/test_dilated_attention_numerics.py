"""``torch.ops.dilated_compile.dilated_attention`` against the float64 dense reference.

Forward (output and log-sum-exp) and backward (dq, dk, dv, also through the log-sum-exp), over
module-level lists of shapes that break kernels: lengths that are not multiples of any segment,
sequences shorter than a segment, sparse heads with rows that attend nothing, GQA, Dv != D,
non-contiguous and offset strides, and every supported dtype; plus hypothesis property tests on
random specs.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dilated_compile
from dilated_compile.spec import DilatedSpec
from dilated_compile.testing import count_matrix, dense_reference

F64 = torch.float64
BATCH = 2
Q_HEADS = 4

# Lengths that are multiples of no segment below, and shorter than many of them.
SEQ_LENS = [1, 7, 31, 77, 130]
SPECS = [
    ((4,), (1,)),  # plain block-local attention
    ((8, 16), (1, 2)),  # LongNet's geometric shape
    ((5, 12, 33), (1, 3, 4)),  # rates that do not divide the segments
    ((3, 10, 20, 64), (1, 2, 5, 8)),  # four configs (head_groups: one head each)
    ((64,), (7,)),  # one sparse config: rows with no key, w > N
]
MODES = ["mixture", "head_groups"]
CAUSAL = [False, True]
KV_HEADS = [4, 2, 1]
HEAD_DIMS = [(8, 8), (16, 16), (32, 32), (16, 8), (8, 24)]  # (D, Dv)
SCALES = [None, 0.05, 0.25, 1.7]
LAYOUTS = ["contiguous", "bnhd_transposed", "sliced", "expanded_batch"]
# Low-precision tolerances against the float64 reference on the same (rounded) inputs.
DTYPE_TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}
ALL_DTYPES = [F64, torch.float32, torch.float16, torch.bfloat16]
F64_TOL = 1e-10
F64_GRAD_TOL = 1e-8


def _op(q, k, v, spec: DilatedSpec, causal: bool = False, scale: float | None = None):
    return torch.ops.dilated_compile.dilated_attention(
        q, k, v, list(spec.segment_lengths), list(spec.dilation_rates), spec.mode, causal, scale
    )


def _make(shape, dtype, gen, layout="contiguous", requires_grad=False):
    """A tensor of ``shape`` [B, H, N, D] in the given memory layout. Values are drawn in float64
    and rounded to ``dtype``, so the reference sees exactly the op's inputs. With
    ``requires_grad`` the leaf is the underlying storage and the result is a view of it."""
    b, h, n, d = shape
    if layout == "contiguous":
        base = torch.randn(b, h, n, d, generator=gen, dtype=F64).to(dtype)
        base.requires_grad_(requires_grad)
        return base
    if layout == "bnhd_transposed":  # the [B, N, H, D] projection layout, transposed
        base = torch.randn(b, n, h, d, generator=gen, dtype=F64).to(dtype)
        base.requires_grad_(requires_grad)
        return base.transpose(1, 2)
    if layout == "sliced":  # a window of a larger tensor: odd strides and a storage offset
        base = torch.randn(b + 1, h + 2, n + 3, d + 5, generator=gen, dtype=F64).to(dtype)
        base.requires_grad_(requires_grad)
        return base[1:, 1 : h + 1, 2 : n + 2, 3 : d + 3]
    if layout == "expanded_batch":  # stride 0 over the batch
        base = torch.randn(1, h, n, d, generator=gen, dtype=F64).to(dtype)
        base.requires_grad_(requires_grad)
        return base.expand(b, h, n, d)
    raise AssertionError(layout)


def _qkv(n, *, hq=Q_HEADS, hkv=Q_HEADS, d=16, dv=None, dtype=F64, seed=0, layout="contiguous",
         requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = _make((BATCH, hq, n, d), dtype, gen, layout, requires_grad)
    k = _make((BATCH, hkv, n, d), dtype, gen, layout, requires_grad)
    v = _make((BATCH, hkv, n, dv), dtype, gen, layout, requires_grad)
    return q, k, v


def _reference(q, k, v, spec, causal=False, scale=None):
    return dense_reference(
        q, k, v, spec, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        return_lse=True,
    )


def _describe(q, k, v, spec, causal, scale) -> str:
    return (
        f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} {q.dtype} "
        f"strides q{q.stride()} {spec} is_causal={causal} scale={scale}"
    )


def _close(actual, expected, tol, what, case):
    torch.testing.assert_close(
        actual.to(F64), expected.to(F64), atol=tol, rtol=tol, msg=lambda m: f"{what} [{case}]: {m}"
    )


def _check_forward(q, k, v, spec, causal=False, scale=None, tol=F64_TOL):
    case = _describe(q, k, v, spec, causal, scale)
    out, lse = _op(q, k, v, spec, causal, scale)
    b, hq, n, _ = q.shape
    assert out.shape == (b, hq, n, v.shape[-1]), case
    assert lse.shape == (b, hq, n), case
    assert out.dtype == q.dtype, case
    assert lse.dtype == (F64 if q.dtype == F64 else torch.float32), case
    ref_out, ref_lse = _reference(q, k, v, spec, causal, scale)
    _close(out, ref_out, tol, "out", case)
    # assert_close compares non-finite values exactly: -inf rows must be -inf in both.
    _close(lse, ref_lse, tol, "lse", case)
    return out, lse


def _loss(out, lse, seed):
    """A random linear functional of out and of the finite entries of lse."""
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)
    gl = torch.randn(lse.shape, generator=gen, dtype=F64).to(lse.dtype)
    finite = torch.isfinite(lse.detach())
    return (out * go).sum() + (lse[finite] * gl[finite]).sum()


def _check_gradients(q, k, v, spec, causal=False, scale=None, tol=F64_GRAD_TOL, seed=0):
    case = _describe(q, k, v, spec, causal, scale)
    out, lse = _op(q, k, v, spec, causal, scale)
    got = torch.autograd.grad(_loss(out, lse, seed), (q, k, v))
    ref_out, ref_lse = _reference(q, k, v, spec, causal, scale)
    expected = torch.autograd.grad(_loss(ref_out, ref_lse, seed), (q, k, v))
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, (name, case)
        _close(g, e, tol, name, case)


# --------------------------------------------------------------------------------------------
# Forward, float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("segments,rates", SPECS)
@pytest.mark.parametrize("n", SEQ_LENS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_forward_float64(segments, rates, n, mode, causal):
    spec = DilatedSpec(segments, rates, mode)
    _check_forward(*_qkv(n, hkv=2, seed=n), spec, causal)


@pytest.mark.parametrize("hkv", KV_HEADS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_forward_gqa(hkv, mode, causal):
    spec = DilatedSpec((6, 13, 40), (1, 2, 5), mode)
    _check_forward(*_qkv(31, hkv=hkv, seed=1), spec, causal)


@pytest.mark.parametrize("d,dv", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_forward_head_dims(d, dv, dtype):
    spec = DilatedSpec((8, 16), (1, 2))
    tol = F64_TOL if dtype == F64 else DTYPE_TOLERANCES[dtype]
    _check_forward(*_qkv(37, hkv=2, d=d, dv=dv, dtype=dtype, seed=2), spec, True, tol=tol)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", MODES)
def test_forward_scale(scale, mode):
    spec = DilatedSpec((4, 9), (2, 3), mode)
    _check_forward(*_qkv(23, seed=3), spec, False, scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_strides_forward_and_backward(layout, mode):
    spec = DilatedSpec((5, 16), (1, 3), mode)
    q, k, v = _qkv(29, hkv=2, d=8, dv=12, seed=4, layout=layout, requires_grad=True)
    if layout != "contiguous":
        assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    _check_forward(q, k, v, spec, True)
    _check_gradients(q, k, v, spec, True)


# --------------------------------------------------------------------------------------------
# Forward, float32 / float16 / bfloat16
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES))
@pytest.mark.parametrize("segments,rates", SPECS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_forward_low_precision(dtype, segments, rates, mode, causal):
    spec = DilatedSpec(segments, rates, mode)
    _check_forward(*_qkv(77, hkv=2, dtype=dtype, seed=5), spec, causal,
                   tol=DTYPE_TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_strides(dtype, layout):
    spec = DilatedSpec((6, 20), (1, 4))
    _check_forward(*_qkv(45, hkv=1, d=32, dv=8, dtype=dtype, seed=6, layout=layout), spec, True,
                   tol=DTYPE_TOLERANCES[dtype])


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("segments,rates", SPECS)
@pytest.mark.parametrize("n", [7, 77])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_gradients_float64(segments, rates, n, mode, causal):
    spec = DilatedSpec(segments, rates, mode)
    _check_gradients(*_qkv(n, hkv=2, seed=7, requires_grad=True), spec, causal)


@pytest.mark.parametrize("hkv", KV_HEADS)
@pytest.mark.parametrize("d,dv", [(8, 8), (16, 8), (8, 24)])
@pytest.mark.parametrize("scale", [None, 0.4])
def test_gradients_gqa_head_dims_scale(hkv, d, dv, scale):
    spec = DilatedSpec((4, 11), (2, 3))
    _check_gradients(*_qkv(19, hkv=hkv, d=d, dv=dv, seed=8, requires_grad=True), spec, True,
                     scale)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_float32(mode):
    spec = DilatedSpec((5, 12, 33), (1, 3, 4), mode)
    _check_gradients(*_qkv(41, hkv=2, dtype=torch.float32, seed=9, requires_grad=True), spec,
                     True, tol=1e-4)


# --------------------------------------------------------------------------------------------
# Rows with no key, empty and single-position sequences
# --------------------------------------------------------------------------------------------


def _unattended_keys(counts: torch.Tensor, hkv: int) -> torch.Tensor:
    """[Hkv, N]: keys that no query head of the kv head's group reads."""
    hq, n, _ = counts.shape
    read = counts.sum(dim=1) > 0  # [Hq, N] key t read by some query of head h
    return ~read.view(hkv, hq // hkv, n).any(dim=1)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("hkv", [4, 2])
def test_empty_rows_exact_zeros(dtype, causal, hkv):
    # w = 8, r = 4 on N = 10: head h only has rows at local index h mod 4; with N = 10 the last
    # segment [8, 10) has local indices 0, 1 only, so heads 2 and 3 have no row there.
    spec = DilatedSpec((8,), (4,))
    n = 10
    q, k, v = _qkv(n, hkv=hkv, d=8, dtype=dtype, seed=10, requires_grad=True)
    out, lse = _op(q, k, v, spec, causal)
    counts = count_matrix(spec, n, Q_HEADS, is_causal=causal)
    empty = counts.sum(-1) == 0  # [Hq, N]
    assert empty.any() and (~empty).any()
    assert torch.isfinite(out).all()
    assert (out[:, empty] == 0).all(), out[:, empty]
    assert torch.isneginf(lse[:, empty]).all(), lse[:, empty]
    assert torch.isfinite(lse[:, ~empty]).all()

    dq, dk, dv = torch.autograd.grad(_loss(out, lse, seed=11), (q, k, v))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), name
    assert (dq[:, empty] == 0).all(), dq[:, empty]
    unattended = _unattended_keys(counts, hkv)
    assert unattended.any()
    assert (dk[:, unattended] == 0).all(), dk[:, unattended]
    assert (dv[:, unattended] == 0).all(), dv[:, unattended]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fully_empty_heads(dtype):
    # w = 8, r = 4 on N = 2 -> w = 2 with local indices {0, 1}: heads 2 and 3 (offsets 2, 3)
    # attend nothing at all; head 0 is position 0 attending itself, head 1 position 1.
    spec = DilatedSpec((8,), (4,))
    q, k, v = _qkv(2, d=8, dtype=dtype, seed=12, requires_grad=True)
    out, lse = _op(q, k, v, spec)
    assert (out[:, 2:] == 0).all() and torch.isneginf(lse[:, 2:]).all()
    assert (out[:, 0, 1] == 0).all() and (out[:, 1, 0] == 0).all()
    assert torch.equal(out[:, 0, 0], v[:, 0, 0]) and torch.equal(out[:, 1, 1], v[:, 1, 1])
    dq, dk, dv = torch.autograd.grad(_loss(out, lse, seed=13), (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
        assert (g[:, 2:] == 0).all()
    if dtype == F64:
        _check_forward(q, k, v, spec)
        _check_gradients(q, k, v, spec)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_empty_sequence(dtype, mode, causal):
    spec = DilatedSpec((4, 8), (1, 2), mode)
    q, k, v = _qkv(0, hkv=2, d=8, dv=6, dtype=dtype, requires_grad=True)
    out, lse = _op(q, k, v, spec, causal)
    assert out.shape == (BATCH, Q_HEADS, 0, 6) and out.dtype == dtype
    assert lse.shape == (BATCH, Q_HEADS, 0)
    dq, dk, dv = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v), allow_unused=True)
    for g, x in zip((dq, dk, dv), (q, k, v)):
        assert g is None or g.shape == x.shape


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_single_position(dtype, mode, causal):
    # N = 1: the query attends itself under each config whose offset is 0, so out = v and
    # lse = s + log(count); heads with no such config are empty. Where exactly one config
    # attends, the softmax weight is exactly 1 and out must equal v bit for bit.
    spec = DilatedSpec((4, 8, 16), (1, 2, 4), mode)
    q, k, v = _qkv(1, hkv=2, d=8, dtype=dtype, seed=14, requires_grad=True)
    out, lse = _op(q, k, v, spec, causal)
    v_per_q = v.repeat_interleave(2, dim=1)
    counts = count_matrix(spec, 1, Q_HEADS)[:, 0, 0]
    assert torch.equal(out[:, counts == 1], v_per_q[:, counts == 1])
    assert (out[:, counts == 0] == 0).all() and torch.isneginf(lse[:, counts == 0]).all()
    tol = F64_TOL if dtype == F64 else DTYPE_TOLERANCES[dtype]
    _check_forward(q, k, v, spec, causal, tol=tol)
    if dtype == F64:
        _check_gradients(q, k, v, spec, causal)


# --------------------------------------------------------------------------------------------
# The public functional
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hkv", KV_HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_functional_matches_op_and_reference(hkv, mode):
    spec = DilatedSpec((4, 16), (1, 4), mode)
    q, k, v = _qkv(21, hkv=hkv, d=8, dv=16, seed=15)
    out = dilated_compile.dilated_attention(
        q, k, v, spec, is_causal=True, scale=0.3, enable_gqa=hkv != Q_HEADS
    )
    op_out, _ = _op(q, k, v, spec, True, 0.3)
    assert torch.equal(out, op_out)
    ref = dense_reference(q, k, v, spec, is_causal=True, scale=0.3, enable_gqa=hkv != Q_HEADS)
    _close(out, ref, F64_TOL, "out", f"functional hkv={hkv} {spec}")


def test_functional_gqa_needs_enable_gqa():
    spec = DilatedSpec((4,), (1,))
    q, k, v = _qkv(8, hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        dilated_compile.dilated_attention(q, k, v, spec)


def test_functional_head_groups_needs_a_head_per_config():
    spec = DilatedSpec((4, 8, 16), (1, 2, 4), "head_groups")
    q, k, v = _qkv(8, hq=2, hkv=2)
    with pytest.raises(ValueError, match="head_groups"):
        dilated_compile.dilated_attention(q, k, v, spec)


# --------------------------------------------------------------------------------------------
# Masks and fewer queries than keys in every dtype (float64: tests/test_masks.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES))
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("q_len", [1, 9, 45])
def test_low_precision_masks_and_fewer_queries(dtype, mask_kind, q_len):
    spec = DilatedSpec((6, 20), (1, 4))
    gen = torch.Generator().manual_seed(q_len)
    q = _make((BATCH, Q_HEADS, q_len, 16), dtype, gen)
    k, v = (_make((BATCH, 2, 45, 16), dtype, gen) for _ in range(2))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(BATCH, 1, 1, 45, generator=gen) < 0.8
    elif mask_kind == "float":  # in the inputs' dtype, as SDPA takes it
        mask = torch.randn(q_len, 45, generator=gen, dtype=F64).to(dtype)
    out, lse = torch.ops.dilated_compile.dilated_attention(
        q, k, v, list(spec.segment_lengths), list(spec.dilation_rates), spec.mode,
        mask is None, None, mask,
    )
    ref_out, ref_lse = dense_reference(
        q, k, v, spec, is_causal=mask is None, enable_gqa=True, return_lse=True, attn_mask=mask
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    case = f"{dtype} q_len={q_len} mask={mask_kind}"
    _close(out, ref_out, DTYPE_TOLERANCES[dtype], "out", case)
    _close(lse, ref_lse, DTYPE_TOLERANCES[dtype], "lse", case)


# --------------------------------------------------------------------------------------------
# Property tests on random specs
# --------------------------------------------------------------------------------------------


@st.composite
def _specs(draw, max_configs: int = 4, max_w: int = 64):
    n_configs = draw(st.integers(1, max_configs))
    ws = [draw(st.integers(1, max_w)) for _ in range(n_configs)]
    rs = [draw(st.integers(1, w)) for w in ws]
    return DilatedSpec(ws, rs, draw(st.sampled_from(MODES)))


_lengths = st.one_of(st.sampled_from([0, *SEQ_LENS]), st.integers(0, 140))
_scales = st.one_of(st.none(), st.floats(0.05, 2.0))


@settings(deadline=None, derandomize=True, max_examples=40)
@given(
    spec=_specs(),
    n=_lengths,
    causal=st.booleans(),
    hkv=st.sampled_from(KV_HEADS),
    d=st.sampled_from([8, 16, 32]),
    dv=st.sampled_from([8, 16, 32]),
    scale=_scales,
    seed=st.integers(0, 2**16),
)
def test_property_forward_float64(spec, n, causal, hkv, d, dv, scale, seed):
    _check_forward(*_qkv(n, hkv=hkv, d=d, dv=dv, seed=seed), spec, causal, scale)


@settings(deadline=None, derandomize=True, max_examples=25)
@given(
    spec=_specs(),
    n=st.one_of(st.sampled_from([0, 1, 7, 31, 77]), st.integers(0, 80)),
    causal=st.booleans(),
    hkv=st.sampled_from(KV_HEADS),
    d=st.sampled_from([8, 16]),
    dv=st.sampled_from([8, 16]),
    scale=_scales,
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_property_gradients_float64(spec, n, causal, hkv, d, dv, scale, layout, seed):
    q, k, v = _qkv(n, hkv=hkv, d=d, dv=dv, seed=seed, layout=layout, requires_grad=True)
    _check_gradients(q, k, v, spec, causal, scale, seed=seed)


@settings(deadline=None, derandomize=True, max_examples=25)
@given(
    spec=_specs(),
    n=_lengths,
    causal=st.booleans(),
    hkv=st.sampled_from(KV_HEADS),
    dtype=st.sampled_from(list(DTYPE_TOLERANCES)),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_property_forward_low_precision(spec, n, causal, hkv, dtype, layout, seed):
    _check_forward(*_qkv(n, hkv=hkv, dtype=dtype, seed=seed, layout=layout), spec, causal,
                   tol=DTYPE_TOLERANCES[dtype])
