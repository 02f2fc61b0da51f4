"""The Triton kernels against the float64 dense reference, forward and backward.

On a CUDA machine the kernels run compiled, in this process. Without one they run on CPU
tensors under the Triton interpreter: the variable ``TRITON_INTERPRET=1`` must be set before
Triton is imported, so ``test_kernels_under_the_triton_interpreter`` runs this module again in
a child process with it set (the rest of the suite keeps compiled Triton). Shapes are tiny:
each interpreted block step costs milliseconds. Lengths are multiples of no segment or block.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dilated_compile import DilatedSpec
from dilated_compile.ops import dilated_attention_backward_op, dilated_attention_op
from dilated_compile.ops._triton import dilated_attention as kernels
from dilated_compile.testing import dense_reference

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETING,
    reason="runs in the TRITON_INTERPRET=1 child process (test_kernels_under_the_triton_interpreter)",
)


@pytest.mark.skipif(DEVICE == "cuda" or INTERPRETING, reason="the kernels run in this process")
def test_kernels_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    summary = child.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, child.stdout


# (B, Hq, Hkv, N, D, Dv, segment_lengths, dilation_rates, mode)
CASES = [
    (1, 2, 2, 40, 32, 32, (16,), (1,), "mixture"),  # one dense config, ragged last segment
    (1, 4, 2, 45, 32, 32, (8, 16, 32), (1, 2, 4), "mixture"),  # GQA, LongNet shape
    (2, 4, 4, 37, 32, 64, (8, 16), (2, 4), "mixture"),  # no rate-1 config: uncovered rows, Dv != D
    (1, 3, 1, 29, 32, 32, (64, 7), (3, 2), "mixture"),  # w > N, MQA, rates > heads
    (1, 5, 5, 50, 32, 32, (8, 16, 64), (1, 2, 4), "head_groups"),  # uneven groups
    (1, 6, 3, 33, 32, 32, (16, 32), (2, 3), "head_groups"),  # GQA across groups
]
DTYPES = {torch.float32: 2e-6, torch.float16: 2e-3}


def _ids(case):
    b, hq, hkv, n, d, dv, w, r, mode = case
    return f"{mode}-N{n}-H{hq}x{hkv}-D{d}x{dv}-w{'_'.join(map(str, w))}-r{'_'.join(map(str, r))}"


def _inputs(case, seed):
    b, hq, hkv, n, d, dv, *_ = case
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, n, d), (b, hkv, n, d), (b, hkv, n, dv))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _reference(q, k, v, spec, is_causal, grad_out, grad_lse):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = dense_reference(
        *leaves, spec, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1], return_lse=True
    )
    finite = torch.isfinite(lse)
    loss = (out * grad_out).sum() + (torch.where(finite, lse, 0) * grad_lse).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


def _relative_error(got, want):
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


@runs_kernels
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernels_match_float64_reference(case, dtype, is_causal):
    *_, segment_lengths, dilation_rates, mode = case
    spec = DilatedSpec(segment_lengths, dilation_rates, mode)
    q, k, v = _inputs(case, seed=hash((case, is_causal)) % 1000)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(q.shape[:-1] + v.shape[-1:], generator=g, dtype=torch.float64)
    grad_lse = torch.randn(q.shape[:-1], generator=g, dtype=torch.float64)
    # Round once so the reference sees exactly the kernels' inputs.
    q, k, v, grad_out, grad_lse = (t.to(dtype).double() for t in (q, k, v, grad_out, grad_lse))
    ref_out, ref_lse, ref_grads = _reference(q, k, v, spec, is_causal, grad_out, grad_lse)
    grad_lse = torch.where(torch.isfinite(ref_lse), grad_lse, 0)

    args = (list(segment_lengths), list(dilation_rates), mode, is_causal, q.shape[-1] ** -0.5)
    dq_, kd, vd, god = (t.to(DEVICE, dtype) for t in (q, k, v, grad_out))
    out, lse = kernels.forward(dq_, kd, vd, *args)
    grads = kernels.backward(god, dq_, kd, vd, out, lse, grad_lse.to(DEVICE, torch.float32), *args)

    tol = DTYPES[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert _relative_error(out, ref_out) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite)  # rows with no key: lse -inf, out 0
    assert (lse.double().cpu()[finite] - ref_lse[finite]).abs().max() < tol * 10
    assert torch.all(out.cpu()[~finite] == 0)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype, name
        assert _relative_error(got, want) < 2 * tol, f"d{name}"


def test_launch_plan_puts_a_rate_one_config_first():
    launches = kernels.plan_launches([8, 16, 32], [2, 1, 4], "mixture", 4)
    assert [launch.rate for launch in launches] == [1, 2, 4]
    groups = kernels.plan_launches([8, 16, 32], [1, 2, 4], "head_groups", 5)
    assert [(g.head_lo, g.head_count, g.fixed_offset) for g in groups] == [(0, 2, 0), (2, 2, 1), (4, 1, 2)]


@runs_kernels
def test_kernels_are_deterministic():
    case = CASES[1]
    q, k, v = (t.to(DEVICE, torch.float32) for t in _inputs(case, seed=3))
    args = ([8, 16, 32], [1, 2, 4], "mixture", True, 0.2)
    runs = []
    for _ in range(2):
        out, lse = kernels.forward(q, k, v, *args)
        runs.append((out, lse, *kernels.backward(torch.ones_like(out), q, k, v, out, lse, None, *args)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize(
    "device, dtype, head_dim, expected",
    [
        ("cpu", torch.float32, 64, False),  # CPU: the PyTorch implementation
        ("meta", torch.float32, 64, False),
    ],
)
def test_op_dispatch_rule_off_cuda(device, dtype, head_dim, expected):
    from dilated_compile.ops.dilated_attention import uses_triton_kernels

    q = torch.empty(1, 2, 8, head_dim, device=device, dtype=dtype)
    assert uses_triton_kernels(q, q, q) is expected


def test_op_on_cpu_runs_the_pytorch_implementation():
    """Off CUDA the public op gives exactly what the PyTorch implementation gives."""
    from dilated_compile.ops.dilated_attention_pytorch import (
        dilated_attention_backward_pytorch_op,
        dilated_attention_pytorch_op,
    )

    q, k, v = _inputs(CASES[1], seed=5)
    args = ([8, 16, 32], [1, 2, 4], "mixture", True, None)
    out, lse = dilated_attention_op(q, k, v, *args)
    want_out, want_lse = dilated_attention_pytorch_op(q, k, v, *args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    grads = dilated_attention_backward_op(torch.ones_like(out), q, k, v, out, lse, None, *args)
    want = dilated_attention_backward_pytorch_op(torch.ones_like(out), q, k, v, out, lse, None, *args)
    assert all(torch.equal(a, b) for a, b in zip(grads, want))
