"""The float64 dense reference, checked on its own.

Every other numerics test trusts ``dilated_compile.testing``; these tests earn that trust by
checking it against hand-computed count matrices, a brute-force loop, PyTorch's SDPA where the
pattern is dense, and LongNet's own formulation (per-config attention merged by softmax
denominators), gradients included.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated_compile.spec import DilatedSpec
from dilated_compile.testing import count_matrix, dense_reference

F64 = torch.float64


def _rand(*shape: int, seed: int, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=F64)
    return x.requires_grad_(requires_grad)


def _t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Count matrices computed by hand
# --------------------------------------------------------------------------------------------

# N = 8, one config (w=4, r=2): segments {0..3}, {4..7}; head 0 (offset 0) uses local indices
# 0, 2 -> positions {0, 2} and {4, 6}; head 1 (offset 1) uses {1, 3} and {5, 7}.
HEAD0_W4_R2 = _t(
    [
        [1, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
)
HEAD1_W4_R2 = _t(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 1],
    ]
)


@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
def test_count_single_config_both_offsets(mode):
    # With one config, head_groups has a single group (offset 0 for every head) while mixture
    # gives head h the offset h mod r.
    spec = DilatedSpec((4,), (2,), mode=mode)
    c = count_matrix(spec, 8, 2)
    assert c.dtype == torch.long and c.shape == (2, 8, 8)
    assert torch.equal(c[0], HEAD0_W4_R2)
    assert torch.equal(c[1], HEAD1_W4_R2 if mode == "mixture" else HEAD0_W4_R2)


def test_count_single_config_causal():
    c = count_matrix(DilatedSpec((4,), (2,)), 8, 2, is_causal=True)
    expected0 = _t(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    expected1 = _t(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0, 1],
        ]
    )
    assert torch.equal(c[0], expected0)
    assert torch.equal(c[1], expected1)


def test_count_mixture_overlapping_configs_add_up():
    # N = 4, configs (2, 1) and (4, 2), one head (offset 0 for both):
    # (2, 1) -> blocks {0,1} and {2,3}; (4, 2) -> {0, 2} x {0, 2}. Overlaps count twice.
    c = count_matrix(DilatedSpec((2, 4), (1, 2)), 4, 1)
    expected = _t(
        [
            [2, 1, 1, 0],
            [1, 1, 0, 0],
            [1, 0, 2, 1],
            [0, 0, 1, 1],
        ]
    )
    assert torch.equal(c[0], expected)
    c_causal = count_matrix(DilatedSpec((2, 4), (1, 2)), 4, 1, is_causal=True)
    assert torch.equal(c_causal[0], torch.tril(expected))


def test_count_head_groups_splits_heads_two_then_one():
    # H = 3, G = 2: groups of sizes [2, 1]. Heads 0, 1 -> config (4, 1) with offset 0 mod 1 = 0;
    # head 2 -> config (8, 2) with offset 1 mod 2 = 1: the odd positions, one segment.
    c = count_matrix(DilatedSpec((4, 8), (1, 2), mode="head_groups"), 8, 3)
    block = torch.zeros(8, 8, dtype=torch.long)
    block[:4, :4] = 1
    block[4:, 4:] = 1
    odd = torch.zeros(8, 8, dtype=torch.long)
    for p in (1, 3, 5, 7):
        for t in (1, 3, 5, 7):
            odd[p, t] = 1
    assert torch.equal(c[0], block)
    assert torch.equal(c[1], block)
    assert torch.equal(c[2], odd)


def test_count_head_groups_five_heads_three_groups():
    # H = 5, G = 3: sizes [2, 2, 1]; group g uses offset g mod r_g.
    spec = DilatedSpec((2, 4, 4), (1, 2, 4), mode="head_groups")
    c = count_matrix(spec, 4, 5)
    g0 = _t([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    g1 = _t([[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]])  # offset 1 mod 2
    g2 = _t([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])  # offset 2 mod 4
    for h, expected in enumerate([g0, g0, g1, g1, g2]):
        assert torch.equal(c[h], expected), h


def test_count_partial_last_segment():
    # N = 6, w = 4, r = 2: segments [0, 4) and [4, 6); positions 4, 5 have local indices 0, 1.
    c = count_matrix(DilatedSpec((4,), (2,)), 6, 2)
    expected0 = torch.zeros(6, 6, dtype=torch.long)
    for p, t in [(0, 0), (0, 2), (2, 0), (2, 2), (4, 4)]:
        expected0[p, t] = 1
    expected1 = torch.zeros(6, 6, dtype=torch.long)
    for p, t in [(1, 1), (1, 3), (3, 1), (3, 3), (5, 5)]:
        expected1[p, t] = 1
    assert torch.equal(c[0], expected0)
    assert torch.equal(c[1], expected1)


def test_count_segment_longer_than_sequence():
    # w = 16 > N = 6 -> w = 6: one segment, the local index is the position.
    c = count_matrix(DilatedSpec((16,), (2,)), 6, 2)
    even = torch.zeros(6, 6, dtype=torch.long)
    even[0::2, 0::2] = 1
    odd = torch.zeros(6, 6, dtype=torch.long)
    odd[1::2, 1::2] = 1
    assert torch.equal(c[0], even)
    assert torch.equal(c[1], odd)
    # Offsets that no local index reaches once w is clipped to N leave the head empty:
    # w = 8, r = 4 on N = 2 -> w = 2, local indices {0, 1}; heads 2 and 3 attend nothing.
    c = count_matrix(DilatedSpec((8,), (4,)), 2, 4)
    assert torch.equal(c[0], _t([[1, 0], [0, 0]]))
    assert torch.equal(c[1], _t([[0, 0], [0, 1]]))
    assert not c[2:].any()


def test_count_empty_sequence():
    c = count_matrix(DilatedSpec((4,), (2,)), 0, 3)
    assert c.shape == (3, 0, 0) and c.dtype == torch.long


def test_count_rejects_too_few_heads_for_head_groups():
    with pytest.raises(ValueError, match="head_groups"):
        count_matrix(DilatedSpec((4, 8, 16), (1, 2, 4), mode="head_groups"), 8, 2)


def _brute_force_counts(spec: DilatedSpec, n: int, heads: int, causal: bool) -> torch.Tensor:
    """Plain loops over (head, config, query, key), straight from DESIGN.md."""
    configs = list(spec.configs)
    if spec.mode == "mixture":
        per_head = [[(w, r, h % r) for w, r in configs] for h in range(heads)]
    else:
        per_head = []
        g_count = len(configs)
        for g, (w, r) in enumerate(configs):
            size = heads // g_count + (1 if g < heads % g_count else 0)
            per_head += [[(w, r, g % r)]] * size
    out = torch.zeros(heads, n, n, dtype=torch.long)
    for h in range(heads):
        for w_i, r, o in per_head[h]:
            w = min(w_i, n)
            for p in range(n):
                for t in range(n):
                    if p // w != t // w:
                        continue
                    if (p % w) % r != o or (t % w) % r != o:
                        continue
                    if causal and t > p:
                        continue
                    out[h, p, t] += 1
    return out


@st.composite
def _specs(draw, max_configs: int = 4, max_w: int = 24):
    n_configs = draw(st.integers(1, max_configs))
    ws = [draw(st.integers(1, max_w)) for _ in range(n_configs)]
    rs = [draw(st.integers(1, w)) for w in ws]
    mode = draw(st.sampled_from(["mixture", "head_groups"]))
    return DilatedSpec(ws, rs, mode=mode)


@settings(deadline=None, derandomize=True, max_examples=40)
@given(
    spec=_specs(),
    n=st.integers(0, 30),
    extra_heads=st.integers(0, 3),
    causal=st.booleans(),
)
def test_count_matches_brute_force(spec, n, extra_heads, causal):
    heads = spec.num_configs + extra_heads
    c = count_matrix(spec, n, heads, is_causal=causal)
    assert torch.equal(c, _brute_force_counts(spec, n, heads, causal))
    # Structural facts: symmetric without causal, causal is the lower triangle, at most one
    # count per config per head.
    full = count_matrix(spec, n, heads)
    assert torch.equal(full, full.transpose(1, 2))
    assert torch.equal(count_matrix(spec, n, heads, is_causal=True), torch.tril(full))
    per_head_configs = spec.num_configs if spec.mode == "mixture" else 1
    assert full.numel() == 0 or int(full.max()) <= per_head_configs


# --------------------------------------------------------------------------------------------
# Dense pattern == SDPA
# --------------------------------------------------------------------------------------------

DENSE_CASES = [
    # (B, Hq, Hkv, N, D, Dv, segment_length)
    (2, 2, 2, 7, 8, 8, 7),
    (2, 4, 4, 13, 16, 8, 64),
    (1, 4, 2, 9, 8, 12, 9),
    (2, 4, 1, 5, 4, 4, 100),
]


@pytest.mark.parametrize("case", DENSE_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
def test_dense_pattern_equals_sdpa(case, causal, scale, mode):
    b, hq, hkv, n, d, dv, w = case
    spec = DilatedSpec((w,), (1,), mode=mode)
    q, k, v = _rand(b, hq, n, d, seed=1), _rand(b, hkv, n, d, seed=2), _rand(b, hkv, n, dv, seed=3)
    gqa = hq != hkv
    out, lse = dense_reference(
        q, k, v, spec, is_causal=causal, scale=scale, enable_gqa=gqa, return_lse=True
    )
    expected = F.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
    )
    assert out.dtype == F64 and out.shape == (b, hq, n, dv)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)

    kk = k.repeat_interleave(hq // hkv, dim=1)
    s = (q @ kk.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(d))
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1), atol=1e-12, rtol=1e-12)


def test_dense_pattern_gradients_equal_sdpa():
    spec = DilatedSpec((32,), (1,))
    q = _rand(2, 4, 11, 8, seed=4, requires_grad=True)
    k = _rand(2, 2, 11, 8, seed=5, requires_grad=True)
    v = _rand(2, 2, 11, 6, seed=6, requires_grad=True)
    go = _rand(2, 4, 11, 6, seed=7)
    for causal in (False, True):
        ours = torch.autograd.grad(
            (dense_reference(q, k, v, spec, is_causal=causal, enable_gqa=True) * go).sum(),
            (q, k, v),
        )
        theirs = torch.autograd.grad(
            (F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True) * go).sum(),
            (q, k, v),
        )
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Count formula == LongNet's formulation (per-config attention, merged by denominators)
# --------------------------------------------------------------------------------------------


def _configs_of_head(spec: DilatedSpec, heads: int, h: int) -> list[tuple[int, int, int]]:
    if spec.mode == "mixture":
        return [(w, r, h % r) for w, r in spec.configs]
    g_count = spec.num_configs
    sizes = [heads // g_count + (1 if g < heads % g_count else 0) for g in range(g_count)]
    g = 0
    while h >= sizes[g]:
        h -= sizes[g]
        g += 1
    w, r = spec.configs[g]
    return [(w, r, g % r)]


def _longnet(q, k, v, spec, causal, scale):
    """LongNet: for each config, sparsify each segment to its dilated rows, run ordinary softmax
    attention on the gathered rows, scatter back; mix the configs by their softmax denominators
    (a softmax over the per-config log-sum-exps). Inputs [B, H, N, *] float64, Hq == Hkv."""
    b, heads, n, _ = q.shape
    dv = v.shape[-1]
    head_outs, head_lses = [], []
    for h in range(heads):
        cfg_outs, cfg_lses = [], []
        for w_i, r, o in _configs_of_head(spec, heads, h):
            w = min(w_i, n)
            out_c = q.new_zeros(b, n, dv)
            lse_c = q.new_full((b, n), -math.inf)
            for start in range(0, n, w):
                idx = [start + j for j in range(min(w, n - start)) if j % r == o]
                if not idx:
                    continue
                rows = torch.tensor(idx)
                qs, ks, vs = q[:, h, rows], k[:, h, rows], v[:, h, rows]
                s = scale * qs @ ks.transpose(-2, -1)
                if causal:
                    s = s.masked_fill(rows[None, :] > rows[:, None], -math.inf)
                out_c = out_c.index_copy(1, rows, torch.softmax(s, dim=-1) @ vs)
                lse_c = lse_c.index_copy(1, rows, torch.logsumexp(s, dim=-1))
            cfg_outs.append(out_c)
            cfg_lses.append(lse_c)
        lses = torch.stack(cfg_lses)  # [C, B, N]
        total = torch.logsumexp(lses, dim=0)
        finite = torch.isfinite(total)
        safe_total = torch.where(finite, total, torch.zeros_like(total))
        mix = torch.where(torch.isfinite(lses), torch.exp(lses - safe_total), torch.zeros_like(lses))
        head_outs.append((mix.unsqueeze(-1) * torch.stack(cfg_outs)).sum(0))
        head_lses.append(total)
    return torch.stack(head_outs, dim=1), torch.stack(head_lses, dim=1)


LONGNET_SPECS = [
    ((4,), (2,)),
    ((4, 8), (1, 2)),
    ((3, 5, 16), (1, 2, 4)),
    ((2, 6, 7, 64), (1, 3, 7, 5)),
]
LONGNET_LENGTHS = [1, 7, 16, 23]


@pytest.mark.parametrize("segments,rates", LONGNET_SPECS)
@pytest.mark.parametrize("n", LONGNET_LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
def test_matches_longnet_merge(segments, rates, n, causal, mode):
    spec = DilatedSpec(segments, rates, mode=mode)
    heads = 5
    q = _rand(2, heads, n, 8, seed=11, requires_grad=True)
    k = _rand(2, heads, n, 8, seed=12, requires_grad=True)
    v = _rand(2, heads, n, 4, seed=13, requires_grad=True)
    out, lse = dense_reference(q, k, v, spec, is_causal=causal, return_lse=True)
    l_out, l_lse = _longnet(q, k, v, spec, causal, 1 / math.sqrt(8))
    torch.testing.assert_close(out, l_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, l_lse, atol=1e-12, rtol=1e-12)

    # Gradients flow through the mixing weights in both formulations and agree.
    go, gl = _rand(2, heads, n, 4, seed=14), _rand(2, heads, n, seed=15)
    finite = torch.isfinite(lse)

    def loss(o, lse_):
        return (o * go).sum() + (lse_[finite] * gl[finite]).sum()

    ours = torch.autograd.grad(loss(out, lse), (q, k, v))
    theirs = torch.autograd.grad(loss(l_out, l_lse), (q, k, v))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# Empty rows, empty sequences, autograd
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_empty_rows_give_zero_output_and_zero_grads(causal):
    # w = 8, r = 4 on N = 10: segments [0, 8) and [8, 10); head h attends local indices = h mod 4.
    spec = DilatedSpec((8,), (4,))
    n = 10
    q = _rand(2, 4, n, 8, seed=21, requires_grad=True)
    k = _rand(2, 4, n, 8, seed=22, requires_grad=True)
    v = _rand(2, 4, n, 8, seed=23, requires_grad=True)
    out, lse = dense_reference(q, k, v, spec, is_causal=causal, return_lse=True)
    counts = count_matrix(spec, n, 4, is_causal=causal)
    empty = counts.sum(-1) == 0  # [H, N]
    unattended = counts.sum(-2) == 0  # keys no query reads
    assert empty.any() and (~empty).any()
    # Head 2 (offset 2): local index 2 exists only in the first segment -> positions 2 and 6.
    assert torch.equal(empty[2], torch.tensor([i not in (2, 6) for i in range(n)]))
    assert (out[:, empty] == 0).all()
    assert torch.isneginf(lse[:, empty]).all()
    assert torch.isfinite(lse[:, ~empty]).all()

    finite = torch.isfinite(lse)
    loss = out.sum() * 0.7 + lse[finite].sum() * 1.3
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[:, empty] == 0).all()
    assert (dk[:, unattended] == 0).all()
    assert (dv[:, unattended] == 0).all()
    assert (dq[:, ~empty] != 0).any()


def test_fully_empty_head_and_gradcheck():
    # w = 8, r = 4 on N = 2 -> w = 2: head 0 sees position 0, head 1 position 1, and heads 2
    # and 3 (offsets 2, 3) attend nothing at all.
    spec = DilatedSpec((8,), (4,))
    q = _rand(1, 4, 2, 3, seed=31, requires_grad=True)
    k = _rand(1, 4, 2, 3, seed=32, requires_grad=True)
    v = _rand(1, 4, 2, 2, seed=33, requires_grad=True)
    out, lse = dense_reference(q, k, v, spec, return_lse=True)
    torch.testing.assert_close(out[:, 0, 0], v[:, 0, 0], atol=0, rtol=0)
    torch.testing.assert_close(out[:, 1, 1], v[:, 1, 1], atol=0, rtol=0)
    assert (out[:, 0, 1] == 0).all() and (out[:, 1, 0] == 0).all() and (out[:, 2:] == 0).all()
    assert torch.isneginf(lse[:, 2:]).all()

    def fn(q, k, v):
        o, lse = dense_reference(q, k, v, spec, return_lse=True)
        return o, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(mode, causal):
    spec = DilatedSpec((3, 5), (1, 2), mode=mode)
    q = _rand(2, 2, 7, 3, seed=41, requires_grad=True)
    k = _rand(2, 1, 7, 3, seed=42, requires_grad=True)
    v = _rand(2, 1, 7, 2, seed=43, requires_grad=True)

    def fn(q, k, v):
        o, lse = dense_reference(q, k, v, spec, is_causal=causal, enable_gqa=True, return_lse=True)
        return o, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_empty_sequence():
    spec = DilatedSpec((4,), (2,))
    q = _rand(2, 4, 0, 8, seed=51, requires_grad=True)
    k = _rand(2, 2, 0, 8, seed=52, requires_grad=True)
    v = _rand(2, 2, 0, 5, seed=53, requires_grad=True)
    out, lse = dense_reference(q, k, v, spec, enable_gqa=True, return_lse=True)
    assert out.shape == (2, 4, 0, 5) and lse.shape == (2, 4, 0)
    dq, dk, dv = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_single_position():
    # N = 1 -> w = 1 and local index 0: head h attends itself under the configs whose offset
    # h mod r is 0. Head 0: all three; head 1: only (4, 1); head 2: (4, 1) and (8, 2).
    # So out = v and lse = s + log(count).
    spec = DilatedSpec((4, 8, 16), (1, 2, 4))
    q, k, v = _rand(2, 3, 1, 8, seed=61), _rand(2, 3, 1, 8, seed=62), _rand(2, 3, 1, 4, seed=63)
    out, lse = dense_reference(q, k, v, spec, return_lse=True)
    torch.testing.assert_close(out, v, atol=0, rtol=0)
    s = (q * k).sum(-1).squeeze(-1) / math.sqrt(8)
    log_count = torch.tensor([3.0, 1.0, 2.0], dtype=F64).log()
    torch.testing.assert_close(lse.squeeze(-1), s + log_count, atol=1e-14, rtol=1e-14)


def test_low_precision_inputs_computed_in_float64():
    spec = DilatedSpec((4, 8), (1, 2))
    q = _rand(1, 2, 9, 8, seed=71).to(torch.bfloat16)
    k = _rand(1, 2, 9, 8, seed=72).to(torch.bfloat16)
    v = _rand(1, 2, 9, 8, seed=73).to(torch.bfloat16)
    out = dense_reference(q, k, v, spec)
    assert out.dtype == F64
    torch.testing.assert_close(out, dense_reference(q.double(), k.double(), v.double(), spec))


def test_argument_errors():
    spec = DilatedSpec((4,), (1,))
    q, k = _rand(1, 4, 8, 8, seed=0), _rand(1, 2, 8, 8, seed=0)
    with pytest.raises(ValueError, match="enable_gqa"):
        dense_reference(q, k, k, spec)
    with pytest.raises(ValueError, match="multiple"):
        dense_reference(q, _rand(1, 3, 8, 8, seed=0), _rand(1, 3, 8, 8, seed=0), spec,
                        enable_gqa=True)
    with pytest.raises(ValueError, match="head_groups"):
        dense_reference(q[:, :1], k[:, :1], k[:, :1], DilatedSpec((4, 8), (1, 2), "head_groups"))
    with pytest.raises(ValueError):
        dense_reference(q[0], k[0], k[0], spec)


# --------------------------------------------------------------------------------------------
# Fewer queries than keys (query i at position Nk - Nq + i) and attn_mask
# --------------------------------------------------------------------------------------------


def test_count_fewer_queries_are_the_last_rows():
    # N = 6, w = 4, r = 2 (see test_count_partial_last_segment): the queries at positions 4, 5.
    c = count_matrix(DilatedSpec((4,), (2,)), 6, 2, query_len=2)
    assert c.shape == (2, 2, 6)
    assert torch.equal(c[0], _t([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]]))
    assert torch.equal(c[1], _t([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]))


def test_count_fewer_queries_causal_is_bottom_right():
    # N = 6, w = 4, r = 1, queries at positions 3, 4, 5: position 3 sees its whole segment
    # [0, 4); 4 and 5 the keys of [4, 6) up to themselves.
    c = count_matrix(DilatedSpec((4,), (1,)), 6, 1, is_causal=True, query_len=3)
    assert torch.equal(c[0], _t([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]))
    assert count_matrix(DilatedSpec((4,), (1,)), 6, 1, query_len=0).shape == (1, 0, 6)


@settings(deadline=None, derandomize=True, max_examples=30)
@given(spec=_specs(), n=st.integers(1, 30), data=st.data(), causal=st.booleans())
def test_count_fewer_queries_matches_the_full_matrix(spec, n, data, causal):
    query_len = data.draw(st.integers(0, n))
    heads = spec.num_configs + 1
    full = count_matrix(spec, n, heads, is_causal=causal)
    part = count_matrix(spec, n, heads, is_causal=causal, query_len=query_len)
    assert torch.equal(part, full[:, n - query_len :])


def test_count_rejects_more_queries_than_keys():
    with pytest.raises(ValueError, match="query_len"):
        count_matrix(DilatedSpec((4,), (1,)), 4, 1, query_len=5)


def _sdpa_masks(b, h, nq, nk):
    """One bool and one float mask of every shape that broadcasts to [B, H, Nq, Nk]; the last
    key is always kept (SDPA gives NaN on rows with no key)."""
    g = torch.Generator().manual_seed(nq * 100 + nk)
    for shape in [(nk,), (nq, nk), (1, 1, nq, nk), (b, 1, 1, nk), (b, h, nq, nk), (b, 1, nq, nk)]:
        keep = torch.rand(shape, generator=g) < 0.6
        keep[..., -1] = True
        bias = torch.randn(shape, generator=g, dtype=F64).masked_fill(
            torch.rand(shape, generator=g) < 0.3, -math.inf
        )
        bias[..., -1] = 0.5
        yield keep
        yield bias


@pytest.mark.parametrize("nq,nk", [(7, 7), (3, 9), (1, 6)])
@pytest.mark.parametrize("hkv", [4, 2])
def test_dense_pattern_with_a_mask_equals_sdpa(nq, nk, hkv):
    """With one dense config the pattern keeps every pair: the mask is SDPA's, for every shape,
    bool and float, with fewer queries than keys too (no causal: no alignment question)."""
    spec = DilatedSpec((64,), (1,))
    q = _rand(2, 4, nq, 8, seed=81, requires_grad=True)
    k = _rand(2, hkv, nk, 8, seed=82, requires_grad=True)
    v = _rand(2, hkv, nk, 5, seed=83, requires_grad=True)
    go = _rand(2, 4, nq, 5, seed=84)
    gqa = hkv != 4
    for mask in _sdpa_masks(2, 4, nq, nk):
        out = dense_reference(q, k, v, spec, enable_gqa=gqa, attn_mask=mask)
        full = mask.expand(2, 4, nq, nk)  # (SDPA on CPU refuses a 1-D mask)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=gqa)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
        ours = torch.autograd.grad((out * go).sum(), (q, k, v))
        theirs = torch.autograd.grad((expected * go).sum(), (q, k, v))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_causal_with_fewer_queries_is_bottom_right_sdpa():
    """SDPA aligns is_causal top-left; the pattern aligns it to the query's position, which is
    SDPA with the bottom-right mask tril(Nk - Nq)."""
    spec = DilatedSpec((64,), (1,))
    q, k, v = _rand(2, 2, 3, 8, seed=85), _rand(2, 2, 10, 8, seed=86), _rand(2, 2, 10, 4, seed=87)
    out = dense_reference(q, k, v, spec, is_causal=True)
    bottom_right = torch.ones(3, 10, dtype=torch.bool).tril(10 - 3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_mask_by_hand():
    # N = 4 keys, w = 2, r = 1: segments {0, 1} and {2, 3}; one query, at position 3, sees keys
    # 2 and 3. A bool mask dropping key 3 leaves key 2 alone: out = v_2, lse = s_32.
    # A float mask adds to the score: weights exp(s_32 + 1) and exp(s_33 - 2).
    spec = DilatedSpec((2,), (1,))
    q, k, v = _rand(1, 1, 1, 4, seed=88), _rand(1, 1, 4, 4, seed=89), _rand(1, 1, 4, 3, seed=90)
    s = (q[0, 0, 0] @ k[0, 0].T) / 2  # scale 1/sqrt(4)
    out, lse = dense_reference(
        q, k, v, spec, return_lse=True, attn_mask=torch.tensor([True, True, True, False])
    )
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 2], atol=0, rtol=0)
    torch.testing.assert_close(lse[0, 0, 0], s[2], atol=1e-15, rtol=1e-15)
    bias = torch.tensor([[5.0, -math.inf, 1.0, -2.0]], dtype=F64)  # keys 0, 1: other segment
    out, lse = dense_reference(q, k, v, spec, return_lse=True, attn_mask=bias)
    weights = torch.stack([s[2] + 1.0, s[3] - 2.0]).exp()
    expected = (weights[0] * v[0, 0, 2] + weights[1] * v[0, 0, 3]) / weights.sum()
    torch.testing.assert_close(out[0, 0, 0], expected, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(lse[0, 0, 0], weights.sum().log(), atol=1e-14, rtol=1e-14)


def test_mask_multiplies_the_counts():
    # Overlapping configs count twice (test_count_mixture_overlapping_configs_add_up): a float
    # mask adds to the score of each copy, c * exp(s + m).
    spec = DilatedSpec((2, 4), (1, 2))
    q, k, v = _rand(1, 1, 4, 4, seed=91), _rand(1, 1, 4, 4, seed=92), _rand(1, 1, 4, 2, seed=93)
    bias = _rand(4, 4, seed=94)
    counts = count_matrix(spec, 4, 1)[0].to(F64)
    s = (q[0, 0] @ k[0, 0].T) / 2 + bias
    weights = counts * s.exp()
    expected = weights @ v[0, 0] / weights.sum(-1, keepdim=True)
    out, lse = dense_reference(q, k, v, spec, return_lse=True, attn_mask=bias)
    torch.testing.assert_close(out[0, 0], expected, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(lse[0, 0], weights.sum(-1).log(), atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_rows_the_mask_empties_give_zeros_and_zero_grads(kind):
    spec = DilatedSpec((4,), (1,))
    q = _rand(1, 2, 3, 4, seed=95, requires_grad=True)
    k = _rand(1, 2, 8, 4, seed=96, requires_grad=True)
    v = _rand(1, 2, 8, 3, seed=97, requires_grad=True)
    keep = torch.ones(1, 2, 3, 8, dtype=torch.bool)
    keep[0, 0, 1] = False  # head 0, query 1 (position 6): no key left
    keep[0, 1, :, 4:] = False  # head 1: every query is in [4, 8), whose keys are all dropped
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=F64).masked_fill(
        ~keep, -math.inf
    )
    out, lse = dense_reference(q, k, v, spec, return_lse=True, attn_mask=mask)
    assert (out[0, 0, 1] == 0).all() and (out[0, 1] == 0).all()
    assert torch.isneginf(lse[0, 0, 1]) and torch.isneginf(lse[0, 1]).all()
    assert torch.isfinite(lse[0, 0, [0, 2]]).all()
    finite = torch.isfinite(lse)
    dq, dk, dv = torch.autograd.grad(out.sum() + lse[finite].sum(), (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[0, 0, 1] == 0).all() and (dq[0, 1] == 0).all()
    assert (dk[0, 1] == 0).all() and (dv[0, 1] == 0).all()
    assert (dk[0, 0, 4:] != 0).any()

    def fn(q, k, v):
        o, row_lse = dense_reference(q, k, v, spec, return_lse=True, attn_mask=mask)
        return o, torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_mask_and_query_argument_errors():
    spec = DilatedSpec((4,), (1,))
    q, k = _rand(1, 2, 6, 8, seed=0), _rand(1, 2, 6, 8, seed=1)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        dense_reference(q, k[:, :, :5], k[:, :, :5], spec)
    with pytest.raises(ValueError, match=r"attn_mask must broadcast.*\(6, 5\)"):
        dense_reference(q, k, k, spec, attn_mask=torch.ones(6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        dense_reference(q, k, k, spec, attn_mask=torch.ones(1, 1, 1, 1, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or floating"):
        dense_reference(q, k, k, spec, attn_mask=torch.ones(6, dtype=torch.long))
