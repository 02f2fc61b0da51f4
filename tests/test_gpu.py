"""The ops and the backend on a CUDA device (skipped without one)."""

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import DilatedSpec, dilated, dilated_attention
from dilated_compile.testing import dense_reference

pytestmark = pytest.mark.gpu

SPECS = [DilatedSpec((64, 128, 256), (1, 2, 4)), DilatedSpec((100, 300), (1, 3), mode="head_groups")]
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _qkv(n, dtype, hq=8, hkv=4, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(2, h, n, d, generator=g, dtype=torch.float64).to("cuda", dtype).requires_grad_()
        for h in (hq, hkv, hkv)
    )


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_matches_float64_reference(spec, is_causal, dtype):
    q, k, v = _qkv(333, dtype)
    out = dilated_attention(q, k, v, spec, is_causal=is_causal, enable_gqa=True)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)

    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*ref_inputs, spec, is_causal=is_causal, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.cpu().double())
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu().double(), want, rtol=10 * tol, atol=10 * tol)


def test_cuda_compiled_equals_eager():
    spec = SPECS[0]

    @dilated(spec)
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sin()

    q, k, v = _qkv(500, torch.float32)
    out = dilated_compile.compile(attend, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, attend(q, k, v))
