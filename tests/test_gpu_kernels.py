"""The Triton path of the ops on a CUDA device: three-way numerics, compiled code, fallbacks.

The kernels' error against the float64 reference must stay within 2x the error of the PyTorch
implementation run in the same dtype on the same inputs, over random specs and ragged lengths
(a small absolute floor covers outputs whose PyTorch error happens to be 0), with and without
attn_mask and with fewer queries than keys.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import DilatedSpec, dilated
from dilated_compile.ops import dilated_attention_op
from dilated_compile.ops.dilated_attention import uses_triton_kernels
from dilated_compile.ops.dilated_attention_pytorch import dilated_attention_pytorch_op
from dilated_compile.testing import dense_reference

pytestmark = pytest.mark.gpu

FLOORS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _random_case(seed: int):
    rng = random.Random(seed)
    configs = rng.randint(1, 4)
    segments = sorted(rng.sample([16, 48, 64, 100, 128, 256, 320, 512], configs))
    rates = sorted(rng.choice([1, 2, 3, 4, 8]) for _ in range(configs))
    mode = rng.choice(["mixture", "head_groups"])
    hkv = rng.choice([1, 2, 4])
    hq = hkv * rng.choice([1, 2]) * (2 if mode == "head_groups" and hkv < 2 else 1)
    hq = max(hq, configs) if mode == "head_groups" else hq
    hq += (-hq) % hkv
    n = rng.choice([1, 17, 200, 333, 777, 1025])
    d = rng.choice([32, 64, 128])
    dv = rng.choice([d, 64])
    return DilatedSpec(tuple(segments), tuple(rates), mode), hq, hkv, n, d, dv, rng.random() < 0.5


def _errors(got, pytorch, ref):
    return (got.double().cpu() - ref).abs().max().item(), (pytorch.double().cpu() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("seed", range(12))
def test_kernels_within_twice_the_pytorch_error(seed, dtype):
    spec, hq, hkv, n, d, dv, causal = _random_case(seed)
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, hq, n, d), (2, hkv, n, d), (2, hkv, n, dv))
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)
    grad = torch.randn(2, hq, n, dv, generator=g, dtype=torch.float64).to(dtype)
    args = (list(spec.segment_lengths), list(spec.dilation_rates), spec.mode, causal, None)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*leaves, spec, is_causal=causal, enable_gqa=hq != hkv)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())

    cuda = [t.cuda().requires_grad_() for t in (q, k, v)]
    assert uses_triton_kernels(*cuda)
    out, _ = dilated_attention_op(*cuda, *args)
    grads = torch.autograd.grad(out, cuda, grad.cuda())
    pt_inputs = [t.cuda().requires_grad_() for t in (q, k, v)]
    pt_out, _ = dilated_attention_pytorch_op(*pt_inputs, *args)
    pt_grads = torch.ops.dilated_compile.dilated_attention_backward_pytorch(
        grad.cuda(), *pt_inputs, pt_out, _, None, *args
    )

    floor = FLOORS[dtype]
    checks = [("out", out, pt_out, ref), *zip(("dq", "dk", "dv"), grads, pt_grads, ref_grads)]
    for name, got, pt, want in checks:
        err, pt_err = _errors(got, pt, want)
        bound = 2 * pt_err + floor * max(want.abs().max().item(), 1.0)
        assert err <= bound, (name, err, pt_err, spec, hq, hkv, n, d, dv, causal)


# (B, Hq, Hkv, Nq, Nk, D, spec, is_causal, mask): mask None, "pad" (bool key padding
# [B, 1, 1, Nk]: batch 1 pads its last 30% of keys), "pad-float" (the same as a 0/-inf float
# mask), "rows" (float [Nq, Nk] with -inf pairs and one -inf row) or "full" (bool
# [B, Hq, Nq, Nk] with one fully masked row). With is_causal the op keeps the pairs both keep.
MASKED_CASES = [
    (2, 4, 2, 777, 777, 64, DilatedSpec((128, 256, 512), (1, 2, 4)), False, "pad"),
    (2, 4, 2, 1025, 1025, 64, DilatedSpec((256, 512), (1, 2)), False, "pad-float"),
    (1, 4, 2, 100, 1025, 64, DilatedSpec((128, 256, 512), (1, 2, 4)), False, "rows"),
    (2, 4, 4, 300, 300, 64, DilatedSpec((64, 128), (1, 2), "head_groups"), False, "full"),
    (1, 6, 3, 1, 333, 128, DilatedSpec((48, 100, 320), (1, 2, 4), "head_groups"), True, None),
    (2, 4, 2, 200, 777, 32, DilatedSpec((64, 256), (2, 4)), True, None),  # no rate-1 config
    (2, 4, 2, 777, 777, 64, DilatedSpec((128, 256, 512), (1, 2, 4)), True, "pad"),  # causal + pad
    (1, 4, 2, 100, 1025, 64, DilatedSpec((128, 256, 512), (1, 2, 4)), True, "rows"),
]


def _make_mask(kind, b, hq, nq, nk, dtype, g):
    if kind is None:
        return None
    if kind.startswith("pad"):
        keep = torch.ones(b, 1, 1, nk, dtype=torch.bool)
        keep[1, ..., nk - nk * 3 // 10:] = False
        if kind == "pad":
            return keep
        return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -math.inf)
    if kind == "rows":
        bias = torch.randn(nq, nk, generator=g, dtype=torch.float64).to(dtype)
        bias = bias.masked_fill(torch.rand(nq, nk, generator=g) < 0.3, -math.inf)
        bias[nq // 2] = -math.inf
        return bias
    keep = torch.rand(b, hq, nq, nk, generator=g) > 0.5
    keep[0, 1, 7] = False
    return keep


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", range(len(MASKED_CASES)))
def test_masked_and_fewer_queries_within_twice_the_pytorch_error(case, dtype):
    b, hq, hkv, nq, nk, d, spec, causal, kind = MASKED_CASES[case]
    g = torch.Generator().manual_seed(case)
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d))
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)
    grad = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    mask = _make_mask(kind, b, hq, nq, nk, dtype, g)
    ref_mask = None if mask is None or mask.dtype == torch.bool else mask.double()
    ref_mask = mask if ref_mask is None else ref_mask

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*leaves, spec, is_causal=causal, enable_gqa=hq != hkv, attn_mask=ref_mask)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())

    cuda_mask = None if mask is None else mask.cuda()
    args = (list(spec.segment_lengths), list(spec.dilation_rates), spec.mode, causal, None)
    cuda = [t.cuda().requires_grad_() for t in (q, k, v)]
    assert uses_triton_kernels(*cuda)
    out, lse = dilated_attention_op(*cuda, *args, cuda_mask)
    grads = torch.autograd.grad(out, cuda, grad.cuda())
    pt_inputs = [t.cuda() for t in (q, k, v)]
    pt_out, pt_lse = dilated_attention_pytorch_op(*pt_inputs, *args, cuda_mask)
    pt_grads = torch.ops.dilated_compile.dilated_attention_backward_pytorch(
        grad.cuda(), *pt_inputs, pt_out, pt_lse, None, *args, cuda_mask
    )

    assert torch.equal(torch.isfinite(lse), torch.isfinite(pt_lse))
    floor = FLOORS[dtype]
    checks = [("out", out, pt_out, ref), *zip(("dq", "dk", "dv"), grads, pt_grads, ref_grads)]
    for name, got, pt, want in checks:
        assert not torch.isnan(got).any(), name
        err, pt_err = _errors(got, pt, want)
        bound = 2 * pt_err + floor * max(want.abs().max().item(), 1.0)
        assert err <= bound, (name, err, pt_err, MASKED_CASES[case])


def test_key_padding_mask_equals_dropping_the_keys():
    """A bool key-padding mask on the last keys gives, on the queries before them, what the op
    gives on the shortened sequence (their segments are the same), gradients included."""
    spec = ([256, 512, 1024], [1, 2, 4], "mixture", False, None)
    n, kept = 3000, 2700
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    keep = torch.arange(n, device="cuda") < kept
    grad = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16)
    grad[:, :, kept:] = 0  # the padded queries' rows have no counterpart on the short sequence
    out, _ = dilated_attention_op(q, k, v, *spec, keep)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    short = [t.detach()[:, :, :kept].clone().requires_grad_() for t in (q, k, v)]
    want, _ = dilated_attention_op(*short, *spec)
    want_grads = torch.autograd.grad(want, short, grad[:, :, :kept])
    torch.testing.assert_close(out[:, :, :kept], want, rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got[:, :, :kept], expected, rtol=2e-2, atol=2e-2)
    assert torch.all(grads[1][:, :, kept:] == 0) and torch.all(grads[2][:, :, kept:] == 0)


def test_decoding_one_token_matches_the_full_forward():
    """With a KV cache, the last query alone gives the full forward's last row (causal)."""
    spec = ([128, 256, 512], [1, 2, 4], "mixture", True, None)
    q, k, v = (torch.randn(2, 8, 1111, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    full, full_lse = dilated_attention_op(q, k, v, *spec)
    last, last_lse = dilated_attention_op(q[:, :, -1:], k, v, *spec)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(last_lse, full_lse[:, :, -1:], rtol=1e-4, atol=1e-4)


def test_head_dim_without_kernel_falls_back_to_pytorch():
    spec = DilatedSpec((64, 128), (1, 2))
    q = torch.randn(1, 2, 150, 48, device="cuda")
    assert not uses_triton_kernels(q, q, q)
    out, _ = dilated_attention_op(q, q, q, [64, 128], [1, 2], "mixture", True, None)
    ref = dense_reference(*(q.double().cpu(),) * 3, spec, is_causal=True)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_kernels_deterministic_on_cuda():
    q, k, v = (torch.randn(1, 8, 3000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    args = ([256, 512, 1024], [1, 2, 4], "mixture", True, None)
    runs = []
    for _ in range(2):
        out, lse = dilated_attention_op(q, k, v, *args)
        runs.append((out, lse, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
def test_compiled_model_runs_the_triton_kernels(mode):
    """Inductor's generated code for forward and backward launches our kernels (it traced into
    the triton_op) and never calls the PyTorch implementation."""
    from torch._inductor.utils import run_and_get_code

    spec = DilatedSpec((128, 256), (1, 2), mode)

    @dilated(spec)
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sin()

    q = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    compiled = dilated_compile.compile(attend, fullgraph=True)

    def step():
        out = compiled(q, k, v)
        out.sum().backward()
        return out

    out, codes = run_and_get_code(step)
    code = "\n".join(codes)
    for kernel in ("dilated_attention_fwd_kernel", "dilated_attention_bwd_dq_kernel",
                   "dilated_attention_bwd_dkdv_kernel"):
        assert kernel in code, kernel
    assert "dilated_attention_pytorch" not in code
    eager_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = attend(*eager_inputs)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
def test_compiled_dynamic_lengths_do_not_recompile(mode):
    """head_groups: the query-side launch's grid spans its groups (a maximum over symbolic
    sizes)."""
    spec = DilatedSpec((128, 256), (1, 2), mode)

    @dilated(spec)
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    compiled = dilated_compile.compile(attend, dynamic=True)
    torch._dynamo.utils.counters.clear()
    for n in (300, 517, 1000, 1300):
        q = torch.randn(1, 4, n, 64, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(compiled(q, q, q), attend(q, q, q), rtol=2e-3, atol=2e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
