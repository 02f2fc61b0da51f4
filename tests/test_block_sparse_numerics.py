"""``torch.ops.dilated_compile.block_sparse_attention`` on the CPU (the exact PyTorch
implementation) against the float64 dense reference: every pattern part and explicit layouts,
causal, GQA, ragged lengths, fewer queries than keys, masks; forward, lse and gradients."""

from __future__ import annotations

import math
import random

import pytest
import torch
from memory_probe import LargestAllocation

from dilated_compile import BlockSparseSpec
from dilated_compile.ops import block_sparse_attention_backward_op, block_sparse_attention_op
from dilated_compile.ops import block_sparse_attention_pytorch as pytorch_impl
from dilated_compile.testing import dense_reference

F64 = torch.float64
TOL, GRAD_TOL = 1e-10, 1e-9


def _op(q, k, v, spec, *, is_causal=False, scale=None, attn_mask=None):
    return block_sparse_attention_op(
        q, k, v, spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks,
        spec.seed, spec.layout, is_causal, scale, attn_mask,
    )


def _qkv(b, hq, hkv, nq, nk, d=5, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    return make(b, hq, nq, d), make(b, hkv, nk, d), make(b, hkv, nk, dv)


def _check(q, k, v, spec, *, is_causal=False, scale=None, attn_mask=None, seed=0):
    out, lse = _op(q, k, v, spec, is_causal=is_causal, scale=scale, attn_mask=attn_mask)
    ref_out, ref_lse = dense_reference(
        q, k, v, spec, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        return_lse=True, attn_mask=attn_mask,
    )
    case = f"{spec} q{tuple(q.shape)} k{tuple(k.shape)} causal={is_causal}"
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=TOL, msg=lambda m: f"{case}: {m}")
    torch.testing.assert_close(lse, ref_lse, atol=TOL, rtol=TOL, msg=lambda m: f"{case}: {m}")
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=F64)
    gl = torch.randn(lse.shape, generator=g, dtype=F64)

    def loss(o, row_lse):  # through out and through the finite lse
        finite = torch.isfinite(row_lse.detach())
        return (o * go).sum() + (row_lse[finite] * gl[finite]).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    want = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), (name, case)
        torch.testing.assert_close(a, b, atol=GRAD_TOL, rtol=GRAD_TOL, msg=lambda m: f"{name} {case}: {m}")
    return out, lse


# Each pattern part alone and together, on lengths that are not multiples of the block.
PATTERNS = {
    "diagonal": dict(block_size=4),
    "band": dict(block_size=4, local_blocks=2),
    "global": dict(block_size=3, local_blocks=None, global_blocks=2),
    "random": dict(block_size=4, local_blocks=None, random_blocks=2, seed=3),
    "bigbird": dict(block_size=4, local_blocks=1, global_blocks=1, random_blocks=2, seed=1),
    "block_size_1": dict(block_size=1, local_blocks=3),
}


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_part_against_the_reference(name, heads, is_causal):
    spec = BlockSparseSpec(**PATTERNS[name])
    for nk in (1, 13, 30):
        q, k, v = _qkv(2, *heads, nk, nk, seed=nk)
        _check(q, k, v, spec, is_causal=is_causal, scale=0.7 if nk == 13 else None, seed=nk)


@pytest.mark.parametrize("layout_heads", [1, 4])
def test_explicit_layouts_alone_and_with_parts(layout_heads):
    g = torch.Generator().manual_seed(layout_heads)
    layout = torch.rand(layout_heads, 9, 9, generator=g) < 0.3  # larger than needed: cut
    for spec in (BlockSparseSpec(4, local_blocks=None, layout=layout),
                 BlockSparseSpec(4, local_blocks=1, random_blocks=1, layout=layout)):
        for causal in (False, True):
            q, k, v = _qkv(2, 4, 2, 27, 27, seed=7)
            _check(q, k, v, spec, is_causal=causal)


@pytest.mark.parametrize("seed", range(6))
def test_random_calls_with_masks_and_fewer_queries(seed):
    rng = random.Random(seed)
    for trial in range(6):
        spec = BlockSparseSpec(
            rng.choice([1, 3, 4, 8]), local_blocks=rng.choice([None, 0, 1]),
            global_blocks=rng.choice([0, 1, 2]), random_blocks=rng.choice([1, 2]),
            seed=rng.randint(0, 9),
        )
        nk = rng.randint(1, 40)
        nq = rng.choice([nk, 1, rng.randint(1, nk)])
        hq, hkv = rng.choice([(2, 2), (4, 2), (3, 1)])
        q, k, v = _qkv(2, hq, hkv, nq, nk, seed=trial)
        g = torch.Generator().manual_seed(trial)
        kind = rng.choice(["none", "padding", "float", "bool-full"])
        mask = {
            "none": None,
            "padding": torch.rand(2, 1, 1, nk, generator=g) < 0.8,
            "float": torch.where(torch.rand(nq, nk, generator=g) < 0.8,
                                 torch.randn(nq, nk, generator=g, dtype=F64), -math.inf),
            "bool-full": torch.rand(2, hq, nq, nk, generator=g) < 0.6,
        }[kind]
        # The op (unlike SDPA) takes is_causal with a mask: the pairs both keep.
        _check(q, k, v, spec, is_causal=rng.random() < 0.5, attn_mask=mask, seed=trial)


def test_rows_with_no_key_give_zero_and_no_nan():
    spec = BlockSparseSpec(4, local_blocks=0)
    q, k, v = _qkv(1, 2, 2, 12, 12)
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[5] = False  # query 5 keeps no key
    out, lse = _check(q, k, v, spec, attn_mask=mask)
    assert torch.all(out[:, :, 5] == 0) and torch.all(torch.isneginf(lse[:, :, 5]))


@pytest.mark.parametrize("is_causal", [False, True])
def test_decoding_against_a_cache_gives_the_rows_of_the_full_forward(is_causal):
    """Queries are the last positions of the keys: one token (or a chunk) against a cache."""
    spec = BlockSparseSpec(4, local_blocks=1, global_blocks=1, random_blocks=1, seed=2)
    q, k, v = _qkv(2, 4, 2, 23, 23, seed=3)
    full_out, full_lse = _op(q, k, v, spec, is_causal=is_causal)
    for nq in (1, 3, 9):
        # Causal decoding: the cache holds no future key, so the mask is all True.
        out, lse = _op(q[:, :, -nq:], k, v, spec, is_causal=is_causal)
        torch.testing.assert_close(out, full_out[:, :, -nq:], atol=1e-12, rtol=0)
        torch.testing.assert_close(lse, full_lse[:, :, -nq:], atol=1e-12, rtol=0)


def test_bad_calls_raise_naming_the_argument():
    q, k, v = _qkv(1, 4, 4, 10, 10)
    with pytest.raises(ValueError, match="layout has 3 heads but the query has 4"):
        _op(q, k, v, BlockSparseSpec(4, local_blocks=None, layout=torch.ones(3, 3, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="covers fewer blocks"):
        _op(q, k, v, BlockSparseSpec(4, local_blocks=None, layout=torch.ones(2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        block_sparse_attention_op(q, k, v, 0, 0, 0, 0, 0, None, False, None)
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        _op(q, k, v, BlockSparseSpec(4), attn_mask=torch.ones(3, 10, dtype=torch.bool))


def test_opcheck_both_ops():
    q, k, v = _qkv(2, 4, 2, 9, 14)
    layout = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    keep = torch.rand(2, 1, 1, 14, generator=torch.Generator().manual_seed(1)) < 0.8
    for spec, causal, mask in (
        (BlockSparseSpec(4, local_blocks=1, global_blocks=1, random_blocks=1, seed=3), True, None),
        (BlockSparseSpec(4, local_blocks=None, layout=layout), False, keep),
    ):
        args = (spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks,
                spec.seed, spec.layout, causal, 0.4)
        torch.library.opcheck(block_sparse_attention_op, (q, k, v, *args, mask))
        out, lse = _op(q, k, v, spec, is_causal=causal, scale=0.4, attn_mask=mask)
        go, gl = torch.randn_like(out), torch.randn_like(lse)
        torch.library.opcheck(
            block_sparse_attention_backward_op,
            (go, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), gl, *args, mask),
        )


def test_memory_stays_linear_with_global_rows_and_key_padding():
    """No N x N tensor: a row's scores are bs x (kept blocks * bs); global rows are chunked."""
    n, heads, d, bs = 4096, 2, 8, 32
    spec = BlockSparseSpec(bs, local_blocks=1, global_blocks=1, random_blocks=1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    keep = torch.rand(1, 1, 1, n, generator=g) < 0.9
    args = (spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks, spec.seed,
            spec.layout, True, None, keep)
    with LargestAllocation(q, k, v, keep) as largest:
        out, lse = pytorch_impl.block_sparse_attention_pytorch._init_fn(q, k, v, *args)
    assert largest.elements < n * n // 8
    with LargestAllocation(q, k, v, keep, out, lse) as largest:
        pytorch_impl.block_sparse_attention_backward_pytorch._init_fn(
            torch.ones_like(out), q, k, v, out, lse, None, *args)
    assert largest.elements < n * n // 8
