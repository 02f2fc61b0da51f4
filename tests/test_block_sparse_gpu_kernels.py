"""The block-sparse op's Triton path on a CUDA device: three-way numerics, determinism, compiled
code, memory, fallbacks.

The kernels' error against the float64 reference must stay within 2x the error of the PyTorch
implementation run in the same dtype on the same inputs (a small absolute floor covers outputs
whose PyTorch error happens to be 0), over random patterns, block sizes and ragged lengths, with
and without attn_mask and with fewer queries than keys.
"""

from __future__ import annotations

import random

import pytest
import torch

from dilated_compile import BlockSparseSpec
from dilated_compile.ops import block_sparse_attention_op
from dilated_compile.ops.block_sparse_attention import uses_block_sparse_kernels
from dilated_compile.ops.block_sparse_attention_pytorch import (
    block_sparse_attention_backward_pytorch_op,
    block_sparse_attention_pytorch_op,
)
from dilated_compile.ops._triton import block_sparse_attention as kernels
from dilated_compile.testing import dense_reference
# The dilated op's GPU tests hold the same rule and masks: their error floors, error pair and
# mask maker serve any pattern.
from test_gpu_kernels import FLOORS, _errors, _make_mask

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _pattern(spec: BlockSparseSpec) -> tuple:
    """The op's pattern arguments of ``spec``."""
    return (spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks, spec.seed,
            spec.layout)


def _random_case(seed: int):
    """A random (spec, Hq, Hkv, Nq, Nk, D, Dv, is_causal): every part of a pattern, block sizes
    16..256, ragged lengths, GQA and MQA, fewer queries than keys."""
    rng = random.Random(seed)
    block = rng.choice([16, 32, 64, 128, 256])
    nk = rng.choice([1, 100, 333, 777, 1025, 2000])
    nq = nk if rng.random() < 0.6 else rng.choice([1, max(1, nk // 3), max(1, nk - 50)])
    hkv = rng.choice([1, 2, 4])
    hq = hkv * rng.choice([1, 2])
    kind = rng.choice(["band", "bigbird", "global", "random", "layout"])
    if kind == "band":
        fields = dict(local_blocks=rng.randint(0, 4))
    elif kind == "bigbird":
        fields = dict(local_blocks=1, global_blocks=rng.randint(1, 2), random_blocks=rng.randint(1, 3),
                      seed=seed)
    elif kind == "global":
        fields = dict(local_blocks=None, global_blocks=rng.randint(1, 2))
    elif kind == "random":  # a per-head index
        fields = dict(local_blocks=None, random_blocks=rng.randint(1, 3), seed=seed)
    else:  # an explicit layout, per head or shared, with rows and columns it leaves empty
        blocks = -(-nk // block)
        g = torch.Generator().manual_seed(seed)
        layout = torch.rand(rng.choice([1, hq]), blocks, blocks, generator=g) < 0.3
        fields = dict(local_blocks=rng.choice([None, 0]), layout=layout)
    d = rng.choice([32, 64, 128])
    dv = rng.choice([d, 64])
    spec = BlockSparseSpec(block, **fields)
    return spec, hq, hkv, nq, nk, d, dv, rng.random() < 0.5


def _check_three_way(spec, q, k, v, grad, is_causal, mask=None):
    """The op (kernels) and the PyTorch implementation against the float64 reference."""
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*leaves, spec, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1],
                          attn_mask=ref_mask)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())

    cuda_mask = None if mask is None else mask.cuda()
    args = (*_pattern(spec), is_causal, None, cuda_mask)
    cuda = [t.cuda().requires_grad_() for t in (q, k, v)]
    assert uses_block_sparse_kernels(*cuda, spec.block_size)
    out, lse = block_sparse_attention_op(*cuda, *args)
    grads = torch.autograd.grad(out, cuda, grad.cuda())
    pt_inputs = [t.cuda() for t in (q, k, v)]
    pt_out, pt_lse = block_sparse_attention_pytorch_op(*pt_inputs, *args)
    pt_grads = block_sparse_attention_backward_pytorch_op(grad.cuda(), *pt_inputs, pt_out, pt_lse, None,
                                                           *args)

    assert torch.equal(torch.isfinite(lse), torch.isfinite(pt_lse))
    floor = FLOORS[q.dtype]
    checks = [("out", out, pt_out, ref), *zip(("dq", "dk", "dv"), grads, pt_grads, ref_grads)]
    for name, got, pt, want in checks:
        assert got.dtype == q.dtype and not torch.isnan(got).any(), name
        err, pt_err = _errors(got, pt, want)
        bound = 2 * pt_err + floor * max(want.abs().max().item(), 1.0)
        assert err <= bound, (name, err, pt_err, spec, tuple(q.shape), tuple(k.shape), is_causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(16))
def test_kernels_within_twice_the_pytorch_error(seed, dtype):
    spec, hq, hkv, nq, nk, d, dv, is_causal = _random_case(seed)
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, hq, nq, d), (2, hkv, nk, d), (2, hkv, nk, dv), (2, hq, nq, dv))
    q, k, v, grad = (torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)
    _check_three_way(spec, q, k, v, grad, is_causal)


# (B, Hq, Hkv, Nq, Nk, D, spec, is_causal, mask): mask a kind of ``test_gpu_kernels._make_mask``:
# "pad" (bool key padding [B, 1, 1, Nk], batch 1 pads its last 30% of keys), "pad-float" (the
# same as a 0/-inf float mask), "rows" (float [Nq, Nk] with -inf pairs and one -inf row) or
# "full" (bool [B, Hq, Nq, Nk] with one fully masked row). With is_causal the op keeps the pairs
# both keep.
MASKED_CASES = [
    (2, 4, 2, 777, 777, 64, BlockSparseSpec(128, local_blocks=2), False, "pad"),
    (2, 4, 2, 1025, 1025, 64, BlockSparseSpec(64, local_blocks=1, global_blocks=1), False, "pad-float"),
    (1, 4, 2, 100, 1025, 64,
     BlockSparseSpec(128, local_blocks=1, global_blocks=1, random_blocks=2, seed=1), False, "rows"),
    (2, 4, 4, 300, 300, 32, BlockSparseSpec(32, local_blocks=1, random_blocks=1, seed=2), False, "full"),
    (1, 6, 3, 1, 333, 128, BlockSparseSpec(64, local_blocks=1, global_blocks=1), True, None),
    (2, 4, 2, 777, 777, 64, BlockSparseSpec(128, local_blocks=2), True, "pad"),
    (1, 4, 2, 100, 1025, 64,
     BlockSparseSpec(128, local_blocks=1, global_blocks=1, random_blocks=2, seed=1), True, "rows"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(MASKED_CASES)))
def test_masked_and_fewer_queries_within_twice_the_pytorch_error(case, dtype):
    b, hq, hkv, nq, nk, d, spec, is_causal, kind = MASKED_CASES[case]
    g = torch.Generator().manual_seed(case)
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d), (b, hq, nq, d))
    q, k, v, grad = (torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)
    mask = _make_mask(kind, b, hq, nq, nk, dtype, g)
    _check_three_way(spec, q, k, v, grad, is_causal, mask)


def test_kernels_deterministic_on_cuda():
    """Bit-identical forward and backward on reruns (no atomics: one writer per output row)."""
    spec = BlockSparseSpec(128, local_blocks=1, global_blocks=2, random_blocks=3, seed=7)
    q = torch.randn(1, 8, 3000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 3000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    runs = []
    for _ in range(2):
        out, lse = block_sparse_attention_op(q, k, v, *_pattern(spec), True, None)
        runs.append((out, lse, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_decoding_one_token_matches_the_full_forward():
    """With a KV cache, the last query alone gives the full forward's last row (causal)."""
    spec = BlockSparseSpec(64, local_blocks=2, global_blocks=1, random_blocks=2, seed=3)
    q, k, v = (torch.randn(2, 8, 1111, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    full, full_lse = block_sparse_attention_op(q, k, v, *_pattern(spec), True, None)
    last, last_lse = block_sparse_attention_op(q[:, :, -1:], k, v, *_pattern(spec), True, None)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(last_lse, full_lse[:, :, -1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_op_runs_the_triton_kernels(dynamic):
    """Inductor's generated code for forward and backward launches the block-sparse kernels (it
    traced into the triton_op) and never calls the PyTorch implementation; with dynamic shapes
    a new length reuses the graph."""
    from torch._inductor.utils import run_and_get_code

    spec = BlockSparseSpec(128, local_blocks=1, global_blocks=1, random_blocks=2, seed=0)

    def attend(q, k, v):
        out, _ = block_sparse_attention_op(q, k, v, *_pattern(spec), True, None)
        return out.sin()

    compiled = torch.compile(attend, backend="inductor", fullgraph=True, dynamic=dynamic)
    torch._dynamo.utils.counters.clear()
    for n in (300, 517) if dynamic else (300,):
        q = torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(2, 2, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        out, codes = run_and_get_code(_forward_backward, compiled, q, k, v)
        if codes:  # a second length without a recompile generates no code
            code = "\n".join(codes)
            assert [name for name in KERNEL_NAMES if name not in code] == []
            assert "block_sparse_attention_pytorch" not in code
        eager = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        torch.testing.assert_close(out, attend(*eager), rtol=2e-2, atol=2e-2)
    if dynamic:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1


KERNEL_NAMES = ("block_sparse_attention_fwd_kernel", "block_sparse_attention_fwd_combine_kernel",
                "block_sparse_attention_bwd_dq_kernel", "block_sparse_attention_bwd_dkdv_kernel")


def _forward_backward(fn, *inputs):
    out = fn(*inputs)
    out.sum().backward()
    return out


def test_memory_is_linear_in_the_length():
    """Forward and backward of a band over 256K positions: beyond the inputs, the peak memory is
    a few times one input (the outputs, the gradients and the block index), nowhere near the
    N x N scores."""
    n, spec = 1 << 18, BlockSparseSpec(128, local_blocks=4)
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, _ = block_sparse_attention_op(q, k, v, *_pattern(spec), False, None)
    torch.autograd.grad(out, (q, k, v), grad)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 12 * q.numel() * q.element_size(), extra


def test_supports_the_kernels_configurations():
    q = torch.empty(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    for block_size in kernels.SUPPORTED_BLOCK_SIZES:
        assert kernels.supports(q, q, q, block_size)
    assert not kernels.supports(q, q, q, 48)  # not a power of two
    assert not kernels.supports(q, q, q, 512)
    odd = torch.empty(1, 2, 64, 48, device="cuda", dtype=torch.bfloat16)
    assert not kernels.supports(odd, odd, odd, 64)
    assert not kernels.supports(q.double(), q.double(), q.double(), 64)


@pytest.mark.parametrize("head_dim, block_size", [(48, 64), (64, 48)])
def test_unsupported_calls_fall_back_to_pytorch(head_dim, block_size):
    spec = BlockSparseSpec(block_size, local_blocks=1)
    q = torch.randn(1, 2, 150, head_dim, device="cuda")
    assert not uses_block_sparse_kernels(q, q, q, block_size)
    out, _ = block_sparse_attention_op(q, q, q, *_pattern(spec), True, None)
    ref = dense_reference(*(q.double().cpu(),) * 3, spec, is_causal=True)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
