"""Where the time of one dilated call goes, kernel by kernel, on one CUDA GPU.

The standard workload (bench_dilated.py) at one length: for each mode and causality, the
forward and the forward+backward under ``torch.profiler``, every CUDA kernel's total time, its
share of the call, and the effective TFLOP/s of the call. Each call is checked against the
PyTorch implementation first. Usage::

    PYTHONPATH=. python benchmarks/profile_dilated.py --n 65536
"""

from __future__ import annotations

import argparse
import collections

import torch
from bench_dilated import B, D, DTYPE, H, Experiment, dilated_flops, ours
from torch.profiler import ProfilerActivity, profile

from dilated_compile.ops.dilated_attention_pytorch import dilated_attention_pytorch_op

REPEATS = 10


def _inputs(n: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_()
            for _ in range(3)]


def _call(e: Experiment, q, k, v):
    out = ours(q, k, v, e)
    if e.backward:
        out.backward(torch.ones_like(out))
    return out


def _check(e: Experiment, q, k, v):
    spec = e.spec
    with torch.no_grad():
        got = ours(q, k, v, e)
        want, _ = dilated_attention_pytorch_op(q, k, v, list(spec.segment_lengths),
                                               list(spec.dilation_rates), spec.mode, e.causal, None)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-2, f"{e}: relative error {err:.2e}"


def profile_one(e: Experiment) -> list[tuple[str, int, float]]:
    q, k, v = _inputs(e.n)
    _check(e, q, k, v)
    for _ in range(3):  # compile and warm up outside the profile
        _call(e, q, k, v)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            _call(e, q, k, v)
        torch.cuda.synchronize()
    totals: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name[:60]]
            entry[0] += 1
            entry[1] += event.device_time / 1000  # us -> ms
    rows = [(name, calls // REPEATS, ms / REPEATS) for name, (calls, ms) in totals.items()]
    return sorted(rows, key=lambda row: -row[2])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64 * 1024)
    parser.add_argument("--modes", nargs="*", default=["mixture", "head_groups"])
    args = parser.parse_args()
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} N={args.n}")
    for mode in args.modes:
        for causal in (False, True):
            for backward in (False, True):
                e = Experiment(mode, causal, args.n, backward)
                rows = profile_one(e)
                total = sum(ms for _, _, ms in rows)
                flops = dilated_flops(e)
                print(f"\n### {mode} causal={int(causal)} {'fwd+bwd' if backward else 'fwd'}: "
                      f"{total:.3f} ms of kernels per call, {flops / total / 1e9:.0f} TFLOP/s")
                print("| kernel | launches per call | ms per call | share |")
                print("|---|---|---|---|")
                for name, calls, ms in rows:
                    print(f"| {name} | {calls} | {ms:.3f} | {ms / total:.0%} |")


if __name__ == "__main__":
    main()
