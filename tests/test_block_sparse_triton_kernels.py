"""The block-sparse Triton kernels against the float64 dense reference, forward and backward.

On a CUDA machine the kernels run compiled, in this process. Without one they run on CPU
tensors under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before Triton is
imported, so ``test_kernels_under_the_triton_interpreter`` runs this module again in a child
process with it set. Shapes are tiny (each interpreted tile step costs milliseconds) and the
interpreter's tiles are 16 x 16, so a block of 32 is walked as two tiles each way. Masks reach
the launchers as the op hands them over: 4-D views with stride 0 on broadcast dims.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dilated_compile import BlockSparseSpec
from dilated_compile.ops._block_layout import build_block_index
from dilated_compile.ops._checks import expand_attn_mask
from dilated_compile.ops._triton import block_sparse_attention as kernels
from dilated_compile.testing import count_matrix, dense_reference
# The dilated kernels' tests check the same outputs against the same reference: their helpers
# (reference, comparison, masks, keys no query attends) take any spec dense_reference takes.
from test_triton_kernels import (
    DEVICE,
    INTERPRETING,
    _assert_matches,
    _make_mask,
    _reference,
    _unattended_keys,
    launch_symbolically,
    launch_with_one_config,
    runs_kernels,
)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda" or INTERPRETING, reason="the kernels run in this process")
def test_kernels_under_the_triton_interpreter():
    """This module again, in a child process that imports Triton with ``TRITON_INTERPRET=1``."""
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "DILATED_COMPILE_AUTOTUNE": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    last = done.stdout.strip().splitlines()[-1:]
    assert done.returncode == 0 and last and " passed" in last[0] and "failed" not in last[0], (
        done.stdout[-6000:] + done.stderr[-3000:])


def _layout(heads: int, blocks: int, seed: int) -> torch.Tensor:
    """A random bool layout ``[heads, blocks, blocks]`` keeping ~40% of the blocks, with query
    block 1 of head 0 empty (its rows: out 0, lse -inf) and key block 2 kept by no row."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(heads, blocks, blocks, generator=g) < 0.4
    keep[0, 1] = False
    keep[:, :, 2] = False
    return keep


# (name, B, Hq, Hkv, Nq, Nk, D, Dv, spec, is_causal, mask): Nq < Nk puts the queries at the
# last positions (with a block of 16 and Nk - Nq = 49 the first query block starts mid-block);
# lengths are multiples of no block unless said. mask: None or a kind of
# ``test_triton_kernels._make_mask`` (~60% of the pairs kept): "bool-b11k" (key padding
# [B, 1, 1, Nk], batch 1 fully masked), "float-qk" (float [Nq, Nk] with -inf pairs and a fully
# masked row), "float-b11k" (float32 key padding), "bool-full" ([B, Hq, Nq, Nk]).
CASES = [
    ("band", 1, 2, 2, 64, 64, 32, 32, BlockSparseSpec(16, local_blocks=1), False, None),
    ("band-ragged-causal", 1, 2, 2, 75, 75, 32, 32, BlockSparseSpec(16, local_blocks=2), True, None),
    ("bigbird-gqa", 1, 4, 2, 77, 77, 32, 32,
     BlockSparseSpec(16, local_blocks=1, global_blocks=1, random_blocks=2, seed=5), False, None),
    ("bigbird-gqa-causal", 1, 4, 2, 77, 77, 32, 32,
     BlockSparseSpec(16, local_blocks=1, global_blocks=1, random_blocks=2, seed=5), True, None),
    ("global-only", 2, 2, 2, 70, 70, 32, 32, BlockSparseSpec(16, local_blocks=None, global_blocks=2),
     False, None),
    # 19 key blocks: a global row's walk is cut into parts merged by the combine kernel.
    ("global-row-parts", 1, 2, 1, 300, 300, 32, 32, BlockSparseSpec(16, local_blocks=0, global_blocks=1),
     False, None),
    ("global-row-parts-tail-padded", 2, 2, 2, 290, 300, 32, 32,
     BlockSparseSpec(16, local_blocks=None, global_blocks=2), False, "bool-b11k"),
    ("random-per-head-mqa", 1, 3, 1, 58, 58, 32, 64,
     BlockSparseSpec(16, local_blocks=None, random_blocks=2, seed=11), False, None),
    ("layout-per-head", 1, 2, 2, 90, 90, 32, 32,
     BlockSparseSpec(16, local_blocks=None, layout=_layout(2, 6, 0)), False, None),
    ("layout-shared-causal", 1, 2, 1, 90, 90, 32, 32,
     BlockSparseSpec(16, local_blocks=0, layout=_layout(1, 6, 1)[0]), True, None),
    ("block32-gqa-causal", 1, 4, 2, 90, 90, 32, 32, BlockSparseSpec(32, local_blocks=1), True, None),
    ("block32-bigbird", 1, 2, 2, 100, 100, 64, 32,
     BlockSparseSpec(32, local_blocks=0, global_blocks=1, random_blocks=1, seed=2), False, None),
    ("tail", 1, 4, 2, 21, 70, 32, 32,
     BlockSparseSpec(16, local_blocks=1, global_blocks=1, random_blocks=1, seed=7), False, None),
    ("tail-causal", 1, 4, 2, 21, 70, 32, 32,
     BlockSparseSpec(16, local_blocks=1, global_blocks=1, random_blocks=1, seed=7), True, None),
    ("decode-one", 1, 2, 1, 1, 70, 32, 32, BlockSparseSpec(16, local_blocks=1, global_blocks=1), True,
     None),
    ("decode-one-block32", 1, 2, 2, 1, 45, 32, 32, BlockSparseSpec(32, local_blocks=0), False, None),
    ("key-padding", 2, 2, 2, 60, 60, 32, 32, BlockSparseSpec(16, local_blocks=1, global_blocks=1),
     False, "bool-b11k"),
    ("key-padding-causal-gqa", 2, 4, 2, 60, 60, 32, 32, BlockSparseSpec(16, local_blocks=1), True,
     "bool-b11k"),
    ("float-rows", 1, 2, 2, 50, 50, 32, 32, BlockSparseSpec(16, local_blocks=1), False, "float-qk"),
    ("float-rows-tail-causal", 1, 2, 1, 30, 66, 32, 32,
     BlockSparseSpec(16, local_blocks=1, random_blocks=1, seed=3), True, "float-qk"),
    ("float-key-padding", 2, 2, 2, 48, 48, 32, 32, BlockSparseSpec(32, local_blocks=0, global_blocks=1),
     False, "float-b11k"),
    ("bool-full-block32", 1, 2, 2, 70, 70, 32, 32, BlockSparseSpec(32, local_blocks=1), True,
     "bool-full"),
    # Keys ending on a block boundary: the forward and dq kernels drop their bounds checks
    # (and with Nq = Nk, or queries starting on a block boundary, the dk/dv kernel too).
    ("whole-blocks-bigbird-gqa", 1, 4, 2, 96, 96, 32, 32,
     BlockSparseSpec(16, local_blocks=1, global_blocks=1, random_blocks=2, seed=4), False, None),
    ("whole-blocks-tail-causal", 1, 4, 2, 40, 96, 32, 32,
     BlockSparseSpec(16, local_blocks=1, global_blocks=1), True, "float-qk"),
    ("whole-blocks-global-row-parts", 2, 2, 1, 304, 304, 32, 32,
     BlockSparseSpec(16, local_blocks=0, global_blocks=1), False, "bool-b11k"),
    # ... and queries starting on one: dk/dv's query tiles all lie inside the queries.
    ("whole-blocks-tail-on-boundary-causal", 2, 4, 2, 48, 96, 32, 32,
     BlockSparseSpec(16, local_blocks=1, random_blocks=1, seed=9), True, "bool-b11k"),
]
# float32 for every case, float16 for a spread of them (interpreted steps are slow).
FP16_CASES = {"band-ragged-causal", "bigbird-gqa", "layout-per-head", "block32-gqa-causal",
              "tail-causal", "decode-one", "key-padding", "float-rows-tail-causal", "global-row-parts",
              "whole-blocks-bigbird-gqa"}
RUNS = [(case, torch.float32) for case in CASES] + [
    (case, torch.float16) for case in CASES if case[0] in FP16_CASES
]


def _pattern_args(spec, is_causal, scale):
    return (spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks, spec.seed,
            spec.layout, is_causal, scale)


@runs_kernels
@pytest.mark.parametrize("case, dtype", RUNS, ids=[f"{c[0]}-{d}" for c, d in RUNS])
def test_kernels_match_float64_reference(case, dtype):
    _, b, hq, hkv, nq, nk, d, dv, spec, is_causal, mask_kind = case
    g = torch.Generator().manual_seed(sum(map(ord, case[0])))
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv), (b, hq, nq, dv), (b, hq, nq))
    # Rounded once so the reference sees exactly the kernels' inputs.
    q, k, v, grad_out, grad_lse = (
        torch.randn(s, generator=g, dtype=torch.float64).to(dtype).double() for s in shapes
    )
    mask = _make_mask(mask_kind, b, hq, nq, nk, dtype, g)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, spec, is_causal, grad_out, grad_lse, mask)

    out, lse, grads = _run_kernels(spec, is_causal, (q, k, v, grad_out, grad_lse), mask, dtype)

    _assert_matches(out, lse, grads, ref_out, ref_lse, ref_grads, dtype)
    # Exact zeros: dq of the rows that keep no key, dk/dv of the keys no query attends.
    untouched = _unattended_keys(spec, is_causal, mask, b, hq, hkv, nq, nk)
    for grad, zero_at in zip(grads, (~torch.isfinite(ref_lse), untouched, untouched)):
        assert torch.all(grad.cpu()[zero_at] == 0)


def _run_kernels(spec, is_causal, tensors, mask, dtype, scale=None):
    """out, lse and (dq, dk, dv) of the kernels on ``tensors`` (q, k, v, dL/dout, dL/dlse), with
    ``mask`` handed over as the op hands it: a 4-D view."""
    q, k, v, grad_out, grad_lse = (t.to(DEVICE, dtype) for t in tensors)
    view = None if mask is None else expand_attn_mask(mask.to(DEVICE), q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (*_pattern_args(spec, is_causal, scale), view)
    out, lse = kernels.forward(q, k, v, *args)
    # dL/dlse stays nonzero on empty rows: their gradients must still be exactly zero.
    return out, lse, kernels.backward(grad_out, q, k, v, out, lse, grad_lse.float(), *args)


def test_cases_cover_what_they_name():
    """The empty rows and columns the layout cases rely on, a first query block that starts
    mid-block and global rows walked in parts are really there."""
    layout_case = next(c for c in CASES if c[0] == "layout-per-head")
    spec, nk = layout_case[8], layout_case[5]
    pairs = count_matrix(spec, nk, 2)
    assert not pairs[0, 16:32].any() and not pairs[:, :, 32:48].any()
    tail = next(c for c in CASES if c[0] == "tail")
    assert (tail[5] - tail[4]) % tail[8].block_size != 0
    for case in (c for c in CASES if c[0].startswith("global-row-parts")):
        _, _, hq, _, nq, nk, _, _, spec, is_causal, _ = case
        index = build_block_index(*_pattern_args(spec, is_causal, 1.0)[:6], hq, nq, nk, is_causal, "cpu")
        assert index.dense_rows > 0 and kernels._dense_split(index, is_causal)[0] > 1


@runs_kernels
@pytest.mark.parametrize("scale", [-8.0, 0.0, 1.5])
def test_kernels_take_any_scale(scale):
    """A positive scale is applied inside the forward's exponent; zero and negative scales, which
    that would get wrong, keep the scaled scores (see the dilated kernels' test)."""
    _, b, hq, hkv, nq, nk, d, dv, spec, is_causal, _ = next(c for c in CASES if c[0] == "tail-causal")
    g = torch.Generator().manual_seed(4)
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv), (b, hq, nq, dv), (b, hq, nq))
    tensors = [torch.randn(s, generator=g, dtype=torch.float64).float().double() for s in shapes]
    leaves = [t.clone().requires_grad_() for t in tensors[:3]]
    ref_out, ref_lse = dense_reference(*leaves, spec, is_causal=is_causal, scale=scale,
                                       enable_gqa=True, return_lse=True)
    loss = (ref_out * tensors[3]).sum() + (ref_lse * tensors[4]).sum()
    ref_grads = torch.autograd.grad(loss, leaves)
    out, lse, grads = _run_kernels(spec, is_causal, tensors, None, torch.float32, scale=scale)
    _assert_matches(out, lse, grads, ref_out, ref_lse, ref_grads, torch.float32,
                    tol=2e-6 * max(1.0, abs(scale)))


@runs_kernels
def test_kernels_are_deterministic():
    """Bit-identical reruns: every output row has one writer, in a fixed order."""
    _, b, hq, hkv, nq, nk, d, dv, spec, is_causal, _ = next(c for c in CASES if c[0] == "bigbird-gqa-causal")
    g = torch.Generator().manual_seed(3)
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv), (b, hq, nq, dv), (b, hq, nq))
    tensors = [torch.randn(s, generator=g) for s in shapes]
    (out, lse, grads), (out2, lse2, grads2) = (
        _run_kernels(spec, is_causal, tensors, None, torch.float32) for _ in range(2))
    for first, second in zip((out, lse, *grads), (out2, lse2, *grads2)):
        assert torch.equal(first, second)


@runs_kernels
def test_kernels_with_no_queries():
    q = torch.randn(1, 2, 0, 32, device=DEVICE)
    k = v = torch.randn(1, 2, 40, 32, device=DEVICE)
    args = _pattern_args(BlockSparseSpec(16, local_blocks=1), False, 0.2)
    out, lse = kernels.forward(q, k, v, *args)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)
    dq, dk, dv = kernels.backward(out, q, k, v, out, lse, None, *args)
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_launchers_take_symbolic_shapes(is_causal, monkeypatch):
    """The launchers' Python (the block index built on the device, the grids) runs on symbolic
    sizes and head counts, as under torch.compile with dynamic shapes (the kernels mocked)."""
    args = _pattern_args(BlockSparseSpec(64, local_blocks=1, global_blocks=1, random_blocks=1),
                         is_causal, 0.125)
    launched = launch_symbolically(kernels, monkeypatch, args, args)
    combine = set() if is_causal else {"block_sparse_attention_fwd_combine_kernel"}
    assert launched == {"block_sparse_fwd_bs64", "block_sparse_bwd_dq_bs64",
                        "block_sparse_bwd_dkdv_bs64"} | combine


def test_whole_blocks_are_read_only_from_a_concrete_length():
    """The bounds checks go only for a concrete length that ends on a block boundary; a
    symbolic one (torch.compile with dynamic shapes) keeps them and adds no guard."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    assert kernels._whole_blocks(256, 128) and not kernels._whole_blocks(300, 128)
    fake = FakeTensorMode(shape_env=ShapeEnv())
    n = fake.from_tensor(torch.empty(256), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC])).shape[0]
    assert isinstance(n, torch.SymInt)
    assert kernels._whole_blocks(n, 128) is False
    assert not fake.shape_env.guards


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_kernels_are_for_cuda_only(device):
    q = torch.empty(1, 2, 64, 64, device=device)
    assert not kernels.supports(q, q, q, 128)


# The dk/dv kernel with its score tiles laid [queries, keys] (the ``BY_QUERY`` candidates the
# tuning may pick), on the cases with a causal diagonal, GQA, fewer queries and each mask kind.
BY_QUERY_CASES = ["band-ragged-causal", "bigbird-gqa-causal", "tail-causal", "key-padding",
                  "float-rows-tail-causal", "bool-full-block32"]


@pytest.fixture
def dkdv_by_query(monkeypatch):
    launch_with_one_config(monkeypatch, "block_sparse_bwd_dkdv", BLOCK_M=16, BLOCK_N=16,
                           BY_QUERY=True)


@runs_kernels
@pytest.mark.parametrize("name", BY_QUERY_CASES)
def test_dkdv_with_score_tiles_by_query(name, dkdv_by_query):
    case = next(c for c in CASES if c[0] == name)
    test_kernels_match_float64_reference(case, torch.float32)
