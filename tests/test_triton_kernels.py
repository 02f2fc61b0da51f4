"""The Triton kernels against the float64 dense reference, forward and backward.

On a CUDA machine the kernels run compiled, in this process. Without one they run on CPU
tensors under the Triton interpreter: the variable ``TRITON_INTERPRET=1`` must be set before
Triton is imported, so ``test_kernels_under_the_triton_interpreter`` runs this module again in
a child process with it set (the rest of the suite keeps compiled Triton). Shapes are tiny:
each interpreted block step costs milliseconds. Lengths are multiples of no segment or block.
Masks reach the launchers as the op hands them over: 4-D views with stride 0 on broadcast dims.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dilated_compile import DilatedSpec
from dilated_compile.ops import dilated_attention_backward_op, dilated_attention_op
from dilated_compile.ops._checks import expand_attn_mask
from dilated_compile.ops._triton import dilated_attention as kernels
from dilated_compile.testing import count_matrix, dense_reference

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
    # five groups: the query-side kernels launch four parts at once, then the fifth alone
    (1, 7, 7, 70, 32, 32, (4, 8, 16, 32, 64), (1, 1, 2, 2, 4), "head_groups"),
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


def _reference(q, k, v, spec, is_causal, grad_out, grad_lse, attn_mask=None):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.double()
    out, lse = dense_reference(
        *leaves, spec, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1], return_lse=True,
        attn_mask=attn_mask,
    )
    finite = torch.isfinite(lse)
    loss = (out * grad_out).sum() + (torch.where(finite, lse, 0) * grad_lse).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


def _relative_error(got, want):
    if want.numel() == 0:
        return 0.0
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

    _assert_matches(out, lse, grads, ref_out, ref_lse, ref_grads, dtype)


def _assert_matches(out, lse, grads, ref_out, ref_lse, ref_grads, dtype, tol=None):
    tol = DTYPES[dtype] if tol is None else tol
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert _relative_error(out, ref_out) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite)  # rows with no key: lse -inf, out 0
    if finite.any():
        assert (lse.double().cpu()[finite] - ref_lse[finite]).abs().max() < tol * 10
    assert torch.all(out.cpu()[~finite] == 0)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype, name
        assert not torch.isnan(got).any(), f"d{name}"
        assert _relative_error(got, want) < 2 * tol, f"d{name}"


def test_launch_plan_puts_a_rate_one_config_first():
    launches = kernels.plan_launches([8, 16, 32], [2, 1, 4], "mixture", 4)
    assert [launch.rate for launch in launches] == [1, 2, 4]
    groups = kernels.plan_launches([8, 16, 32], [1, 2, 4], "head_groups", 5)
    assert [(g.head_lo, g.head_count, g.fixed_offset) for g in groups] == [(0, 2, 0), (2, 2, 1), (4, 1, 2)]


def test_configs_keep_the_walks_block_aligned():
    """Every candidate config (and the shipped ones, which are candidates) of the forward and dq
    kernels has BLOCK_M a multiple of BLOCK_N, every dk/dv config BLOCK_N a multiple of BLOCK_M:
    the whole/edge split of each walk (``_key_range``, ``_query_blocks``) relies on it."""
    import json

    from dilated_compile.ops._triton.tuning import TABLE_PATH

    lists = {"fwd": kernels._FWD_CONFIGS + kernels._FWD_CONFIGS_FP32,
             "dq": kernels._DQ_CONFIGS + kernels._DQ_CONFIGS_FP32,
             "dkdv": kernels._DKDV_CONFIGS + kernels._DKDV_CONFIGS_FP32}
    tiles = {kind: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs]
             for kind, configs in lists.items()}
    for device in json.loads(TABLE_PATH.read_text())["devices"].values():
        for name, entries in device["kernels"].items():
            kind = name.removeprefix("dilated_").removeprefix("bwd_").removesuffix("_fp32")
            if kind in tiles:
                tiles[kind] += [(e["kwargs"]["BLOCK_M"], e["kwargs"]["BLOCK_N"])
                                for e in entries.values()]
    for kind, shapes in tiles.items():
        for block_m, block_n in shapes:
            assert (block_m % block_n if kind != "dkdv" else block_n % block_m) == 0, (kind, block_m, block_n)


def test_launch_order_with_symbolic_heads():
    """Under torch.compile with dynamic shapes the head count is a SymInt: the forward's launch
    order (rate-1 config over every head last) must still sort, on Python bools."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    heads = env.create_symintnode(env.create_symbol(4, source=ConstantSource("heads")), hint=4)
    launches = kernels.plan_launches([128, 256, 512], [1, 2, 4], "mixture", heads)
    assert all(type(launch.covers_every_row(heads)) is bool for launch in launches)
    launches.sort(key=lambda launch: launch.covers_every_row(heads))
    assert [launch.rate for launch in launches] == [2, 4, 1]


class _Recorder:
    """``_launcher(kernel)`` that records the launch instead (``[grid](*args)``)."""

    def __init__(self, kernel, launched: set):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.add(self.kernel.fn.__name__)


def launch_symbolically(module, monkeypatch, forward_args, backward_args) -> set[str]:
    """Run ``module``'s forward and backward launchers as torch.compile with dynamic shapes
    does: on fake tensors whose sizes, head counts included, are all symbolic (bf16, B=2, Hq=4,
    Hkv=2, N=300, D=64), the kernels mocked. The registered kernel names launched."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    launched = set()
    monkeypatch.setattr(module, "launch_tuned", lambda name, grid, *args, **kwargs: launched.add(
        name) or grid({"BLOCK_M": 64, "BLOCK_N": 64}))
    monkeypatch.setattr(module, "launch_delta", lambda grad_out, out, lse, grad_lse: lse)
    if hasattr(module, "_launcher"):  # kernels launched untuned: ``_launcher(kernel)[grid](...)``
        monkeypatch.setattr(module, "_launcher", lambda kernel: _Recorder(kernel, launched))
    fake = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 4)
    q, k = (fake.from_tensor(torch.empty(2, h, 300, 64, dtype=torch.bfloat16), symbolic_context=dynamic)
            for h in (4, 2))
    assert isinstance(q.shape[1], torch.SymInt)
    with fake:
        out, lse = module.forward(q, k, k, *forward_args)
        grads = module.backward(out, q, k, k, out, lse, None, *backward_args)
    assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    return launched


@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
def test_launchers_take_symbolic_shapes(mode, monkeypatch):
    """The launch plan's Python runs on symbolic sizes and head counts (the kernels mocked)."""
    args = ([128, 256, 512], [1, 2, 4], mode, True, 0.125)
    launched = launch_symbolically(kernels, monkeypatch, args, args)
    assert launched == {"dilated_fwd", "dilated_bwd_dq", "dilated_bwd_dkdv"}


def test_launches_group_head_parts():
    """head_groups parts share a launch four at a time; mixture configs do not (their launches
    merge one after another)."""
    parts = kernels.plan_launches([4, 8, 16, 32, 64], [1, 1, 2, 2, 4], "head_groups", 7)
    grouped = kernels._GroupedLaunch.plan(parts, True, 70, 70)
    assert [len(g.parts) for g in grouped] == [4, 1]
    head_lo, head_count, seg_len, rate, offset, bucket, *extra = grouped[0].args()
    assert (head_lo, head_count, seg_len, rate, offset, bucket) == (0, 6, 4, 1, 0, 16)
    assert extra == [2, 8, 1, 0, 4, 16, 2, 0, 5, 32, 2, 1]
    assert grouped[0].grid(2)({"BLOCK_M": 4}) == (4, 18, 12)  # 16 rows / 4; 70 / 4 segments
    assert grouped[0].kv_heads(2, 7) == (0, 3, 1)
    assert grouped[0].kv_grid(2, 3, 1)({"BLOCK_N": 8}) == (2, 18, 6)
    mixture = kernels.plan_launches([8, 16, 32], [1, 2, 4], "mixture", 4)
    singles = kernels._GroupedLaunch.plan(mixture, False, 45, 45)
    assert [len(g.parts) for g in singles] == [1, 1, 1]
    assert singles[1].kv_heads(1, 4) == (0, 4, 2)  # rate 2: two offsets per kv head


@runs_kernels
@pytest.mark.parametrize("scale", [-8.0, 0.0, 1.5])
def test_kernels_take_any_scale(scale):
    """A positive scale is applied inside the forward's exponent (the row maximum taken on the
    raw products); zero and negative scales, which that would get wrong (NaN from a masked -inf
    times 0; a row "maximum" that is the minimum, overflowing exp2 at this scale), keep the
    scaled scores. Float32 rounding grows with |scale|, hence the tolerance."""
    case = CASES[1]
    *_, segment_lengths, dilation_rates, mode = case
    spec = DilatedSpec(segment_lengths, dilation_rates, mode)
    q, k, v = _inputs(case, seed=11)
    q, k, v = (t.float().double() for t in (q, k, v))
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(q.shape[:-1] + v.shape[-1:], generator=g, dtype=torch.float64)
    grad_lse = torch.randn(q.shape[:-1], generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_reference(*leaves, spec, is_causal=True, scale=scale, enable_gqa=True,
                                       return_lse=True)
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse * grad_lse).sum(), leaves)
    args = (list(segment_lengths), list(dilation_rates), mode, True, scale)
    dq_, kd, vd, god = (t.to(DEVICE, torch.float32) for t in (q, k, v, grad_out))
    out, lse = kernels.forward(dq_, kd, vd, *args)
    grads = kernels.backward(god, dq_, kd, vd, out, lse, grad_lse.to(DEVICE, torch.float32), *args)
    _assert_matches(out, lse, grads, ref_out, ref_lse, ref_grads, torch.float32,
                    tol=2e-6 * max(1.0, abs(scale)))


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


# Fewer queries than keys and attn_mask. (B, Hq, Hkv, Nq, Nk, segment_lengths, dilation_rates,
# mode, is_causal, mask): mask "<bool|float>-<shape>" with shape k = [Nk], qk = [Nq, Nk],
# b11k = [B, 1, 1, Nk] (key padding), full = [B, Hq, Nq, Nk]; with is_causal the pairs both keep
# (the op takes the two together; SDPA-shaped entry points refuse them). D = Dv = 32.
MASKED_CASES = [
    (1, 4, 2, 19, 45, (8, 16, 32), (1, 2, 4), "mixture", False, None),  # Nq < Nk, GQA
    (1, 4, 2, 19, 45, (8, 16, 32), (1, 2, 4), "mixture", True, None),  # bottom-right causal
    (1, 4, 2, 1, 45, (8, 16, 32), (1, 2, 4), "mixture", True, None),  # decoding one token
    (1, 5, 5, 1, 50, (8, 16, 64), (1, 2, 4), "head_groups", False, None),
    (2, 4, 4, 13, 37, (8, 16), (2, 4), "mixture", True, None),  # no rate-1 config
    (1, 4, 2, 33, 33, (8, 16), (1, 2), "mixture", False, "bool-k"),
    (2, 2, 2, 29, 29, (16,), (1,), "mixture", False, "bool-b11k"),  # batch 1 fully masked
    (1, 4, 2, 17, 40, (8, 16, 32), (1, 2, 4), "mixture", False, "bool-qk"),
    (1, 6, 3, 21, 33, (16, 32), (2, 3), "head_groups", False, "bool-full"),
    (1, 2, 1, 30, 30, (16,), (1,), "mixture", False, "float-k"),
    (1, 4, 2, 11, 45, (8, 16, 32), (1, 2, 4), "mixture", False, "float-qk"),
    (2, 3, 1, 25, 25, (64, 7), (3, 2), "mixture", False, "float-b11k"),  # w > N, MQA
    (1, 4, 2, 1, 37, (8, 16), (1, 2), "mixture", False, "float-full"),  # decoding with a mask
    (2, 4, 2, 29, 29, (8, 16), (1, 2), "mixture", True, "bool-b11k"),  # causal + key padding
    # Padding runs (right, then left): segments whose keys are all kept, all padded, or mixed.
    (2, 4, 2, 45, 45, (8, 16), (1, 2), "mixture", False, "bool-pad"),
    (2, 3, 3, 20, 45, (8, 16, 32), (1, 2, 4), "head_groups", True, "float-pad"),
    (1, 4, 4, 14, 40, (8, 32), (1, 4), "head_groups", True, "float-qk"),
]


def _masked_ids(case):
    b, hq, hkv, nq, nk, w, r, mode, causal, mask = case
    return f"{mode}-Nq{nq}-Nk{nk}-H{hq}x{hkv}-w{'_'.join(map(str, w))}-r{'_'.join(map(str, r))}" + (
        "-causal" if causal else "") + f"-{mask or 'nomask'}"


def _make_mask(kind, b, hq, nq, nk, dtype, g):
    """A mask of the given kind that keeps ~60% of the pairs, with a fully masked query row
    (when it has a query dim) and a fully masked batch (when it has a batch dim and B > 1);
    "pad": key padding [B, 1, 1, Nk] in runs (batch 0 keeps its first 60% of keys, the others
    their last 70%; a float one is 0 / -inf), so that some segments keep all their keys, some
    none and some a part."""
    if kind is None:
        return None
    mask_type, shape_name = kind.split("-")
    if shape_name == "pad":
        keep = torch.zeros(b, 1, 1, nk, dtype=torch.bool)
        keep[0, ..., : nk * 6 // 10] = True
        keep[1:, ..., nk * 3 // 10 :] = True
        if mask_type == "bool":
            return keep
        return torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, float("-inf"))
    shape = {"k": (nk,), "qk": (nq, nk), "b11k": (b, 1, 1, nk), "full": (b, hq, nq, nk)}[shape_name]
    keep = torch.rand(shape, generator=g) > 0.4
    if len(shape) >= 2 and shape[-2] > 1:
        keep[..., 0, :] = False
    if len(shape) == 4 and b > 1:
        keep[1] = False
    if mask_type == "bool":
        return keep
    # Key padding in float32, the others in the inputs' dtype: the op takes both.
    bias_dtype = torch.float32 if shape_name == "b11k" else dtype
    bias = torch.randn(shape, generator=g, dtype=torch.float64).to(bias_dtype)
    return bias.masked_fill(~keep, float("-inf"))


def _unattended_keys(spec, is_causal, mask, b, hq, hkv, nq, nk):
    """[B, Hkv, Nk] True where no query (of any head of the kv head's group) attends the key."""
    pairs = count_matrix(spec, nk, hq, is_causal=is_causal, query_len=nq) > 0  # [Hq, Nq, Nk]
    pairs = pairs.expand(b, hq, nq, nk)
    if mask is not None:
        pairs = pairs & (mask if mask.dtype == torch.bool else mask > float("-inf"))
    return ~pairs.any(dim=2).view(b, hkv, hq // hkv, nk).any(dim=2)


# float32 for every case; float16 too for the masked ones and decoding (interpreted steps are slow).
MASKED_RUNS = [(case, torch.float32) for case in MASKED_CASES] + [
    (case, torch.float16) for case in MASKED_CASES if case[-1] is not None or case[3] == 1
]


@runs_kernels
@pytest.mark.parametrize(
    "case, dtype", MASKED_RUNS, ids=[f"{_masked_ids(c)}-{d}" for c, d in MASKED_RUNS]
)
def test_kernels_with_masks_and_fewer_queries(case, dtype):
    _check_masked_case(case, dtype)


def _check_masked_case(case, dtype):
    """The kernels against the float64 reference on one case of ``MASKED_CASES``' form."""
    b, hq, hkv, nq, nk, segment_lengths, dilation_rates, mode, is_causal, mask_kind = case
    spec = DilatedSpec(segment_lengths, dilation_rates, mode)
    g = torch.Generator().manual_seed(hash(case) % 1000)
    shapes = ((b, hq, nq, 32), (b, hkv, nk, 32), (b, hkv, nk, 32), (b, hq, nq, 32), (b, hq, nq))
    # Rounded once so the reference sees exactly the kernels' inputs.
    q, k, v, grad_out, grad_lse = (
        torch.randn(s, generator=g, dtype=torch.float64).to(dtype).double() for s in shapes
    )
    mask = _make_mask(mask_kind, b, hq, nq, nk, dtype, g)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, spec, is_causal, grad_out, grad_lse, mask)

    dq_, kd, vd, god = (t.to(DEVICE, dtype) for t in (q, k, v, grad_out))
    view = None if mask is None else expand_attn_mask(mask.to(DEVICE), dq_, kd)
    args = (list(segment_lengths), list(dilation_rates), mode, is_causal, 32 ** -0.5, view)
    out, lse = kernels.forward(dq_, kd, vd, *args)
    # grad_lse stays nonzero on empty rows: their gradients must still be exactly zero.
    grads = kernels.backward(god, dq_, kd, vd, out, lse, grad_lse.to(DEVICE, torch.float32), *args)

    _assert_matches(out, lse, grads, ref_out, ref_lse, ref_grads, dtype)
    assert torch.all(grads[0].cpu()[~torch.isfinite(ref_lse)] == 0)
    unattended = _unattended_keys(spec, is_causal, mask, b, hq, hkv, nq, nk)
    for got in grads[1:]:
        assert torch.all(got.cpu()[unattended] == 0)


@runs_kernels
def test_kernels_with_no_queries():
    q = torch.randn(1, 2, 0, 32, device=DEVICE)
    k = v = torch.randn(1, 2, 9, 32, device=DEVICE)
    args = ([8], [1], "mixture", False, 0.2)
    out, lse = kernels.forward(q, k, v, *args)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)
    dq, dk, dv = kernels.backward(out, q, k, v, out, lse, None, *args)
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


# Tiles that are not square: the forward and dq walk two key blocks per query block, dk/dv two
# query blocks per key block, so the causal diagonal spans several blocks and the split of
# every walk into whole blocks (no per-pair checks) and edge blocks is exercised beyond the
# single-block case the default interpreter tiles give. (B, Hq, Hkv, Nq, Nk, segment_lengths,
# dilation_rates, mode, is_causal, mask) as in MASKED_CASES.
UNEVEN_TILE_CASES = [
    (1, 4, 2, 100, 100, (64, 32), (1, 2), "mixture", True, None),  # ragged last segment
    (1, 4, 2, 100, 100, (64, 32), (1, 2), "mixture", False, None),
    (1, 4, 2, 71, 100, (64, 32), (1, 2), "mixture", True, None),  # queries start mid-block
    (1, 4, 4, 90, 90, (64, 32), (2, 1), "head_groups", True, None),
    (2, 4, 2, 90, 90, (64, 32), (1, 2), "mixture", True, "bool-pad"),  # key padding, two launches
    (1, 4, 2, 53, 90, (64,), (1,), "mixture", True, "float-qk"),
]
_UNEVEN_TILES = {"dilated_fwd": (32, 16), "dilated_bwd_dq": (32, 16), "dilated_bwd_dkdv": (16, 32)}


def launch_with_one_config(monkeypatch, prefix: str, **constexprs) -> None:
    """Give the registered kernels whose names start with ``prefix`` the single config
    ``constexprs`` (4 warps, 2 stages); on CUDA ``DILATED_COMPILE_AUTOTUNE=0`` then launches it
    (the first candidate), and the interpreter launches a kernel's candidates as they are."""
    import triton

    from dilated_compile.ops._triton.tuning import REGISTRY

    monkeypatch.setenv("DILATED_COMPILE_AUTOTUNE", "0")
    config = triton.Config(constexprs, num_warps=4, num_stages=2)
    names = [name for name in REGISTRY if name.startswith(prefix)]
    assert names, prefix
    for name in names:
        monkeypatch.setattr(REGISTRY[name], "configs", [config])


@pytest.fixture
def uneven_tiles(monkeypatch):
    for name, (block_m, block_n) in _UNEVEN_TILES.items():  # and the float32 variants
        by_query = {"BY_QUERY": False} if name == "dilated_bwd_dkdv" else {}
        launch_with_one_config(monkeypatch, name, BLOCK_M=block_m, BLOCK_N=block_n, **by_query)


@runs_kernels
@pytest.mark.parametrize("case", UNEVEN_TILE_CASES, ids=_masked_ids)
def test_kernels_with_uneven_tiles(case, uneven_tiles):
    _check_masked_case(case, torch.float32)


# The dk/dv kernel with its score tiles laid [queries, keys] (the ``BY_QUERY`` candidates the
# tuning may pick): GQA, causal diagonals over uneven tiles, fewer queries, both mask kinds.
BY_QUERY_CASES = [
    (1, 4, 2, 45, 45, (8, 16, 32), (1, 2, 4), "mixture", True, None),
    (1, 6, 3, 33, 33, (16, 32), (2, 3), "head_groups", False, None),
    (1, 4, 2, 19, 45, (8, 16, 32), (1, 2, 4), "mixture", True, None),  # Nq < Nk
    (1, 4, 2, 100, 100, (64, 32), (1, 2), "mixture", True, None),  # diagonal over 2 blocks
    (1, 4, 2, 11, 45, (8, 16, 32), (1, 2, 4), "mixture", False, "float-qk"),  # per-query mask
    (2, 4, 2, 45, 45, (8, 16), (1, 2), "mixture", False, "bool-pad"),  # key padding, 2 launches
    (2, 3, 1, 25, 25, (64, 7), (3, 2), "mixture", False, "float-b11k"),  # one key vector, MQA
]


@pytest.fixture
def dkdv_by_query(monkeypatch):
    launch_with_one_config(monkeypatch, "dilated_bwd_dkdv", BLOCK_M=16, BLOCK_N=32, BY_QUERY=True)


@runs_kernels
@pytest.mark.parametrize("case", BY_QUERY_CASES, ids=_masked_ids)
def test_dkdv_with_score_tiles_by_query(case, dkdv_by_query):
    _check_masked_case(case, torch.float32)
