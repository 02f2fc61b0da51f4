"""Dilated attention against the baselines of BENCHMARKS.md, on one CUDA GPU.

Standard workload: bf16, B=1, H=16, D=64, segment_lengths=(2048, 4096, 8192, 16384),
dilation_rates=(1, 2, 4, 8), both modes, causal and not, forward and forward+backward.

Baselines, on the same inputs in the same process:
  dense       F.scaled_dot_product_attention, default backend, full N x N (the dense ceiling)
  hg-eager    head_groups the way the earlier ports do it: strided view per segment, reshape,
              SDPA per group, scatter back
  mix-eager   per config and offset, the SDPA kernel that returns the log-sum-exp, then the fp32
              log-sum-exp merge (its lse is not differentiable in PyTorch, so its backward skips
              the merge weights' gradient: a lower bound on the time of an exact eager backward)
  flex        FlexAttention with the pattern's mask_mod (+ score_mod log(count) for mixture),
              forward only

"graph ms" is our call replayed from a CUDA graph: the GPU's time alone, without the ~0.5 ms
that issuing a call's launches costs the host (it shows where the GPU would otherwise wait).

Every implementation is checked against ours (itself checked against the PyTorch implementation
and, at a small size, the float64 reference) before it is timed. Times are medians of
``triton.testing.do_bench``; effective TFLOP/s counts useful work only (BENCHMARKS.md; halved
when causal). Usage::

    PYTHONPATH=. python benchmarks/bench_dilated.py                 # the whole table
    PYTHONPATH=. python benchmarks/bench_dilated.py --n 65536 --modes mixture --no-causal
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from timing import graph_ms, median_ms

from dilated_compile import DilatedSpec
from dilated_compile.ops import dilated_attention_op
from dilated_compile.ops.dilated_attention import uses_triton_kernels
from dilated_compile.ops.dilated_attention_pytorch import dilated_attention_pytorch_op
from dilated_compile.testing import dense_reference

SEGMENTS = (2048, 4096, 8192, 16384)
RATES = (1, 2, 4, 8)
B, H, D = 1, 16, 64
DTYPE = torch.bfloat16
K = 1024
# Baselines that are quadratic (or need an N^2/128^2 block mask) stop here.
DENSE_MAX_N = 64 * K
FLEX_MAX_N = 64 * K
EAGER_MAX_N = 256 * K


@dataclasses.dataclass(frozen=True)
class Experiment:
    mode: str
    causal: bool
    n: int
    backward: bool

    @property
    def spec(self) -> DilatedSpec:
        return DilatedSpec(SEGMENTS, RATES, self.mode)


# --- useful work -----------------------------------------------------------------------------


def head_configs(mode: str) -> list[tuple[int, int, int]]:
    """(heads, w, r) triples: which configs each head attends under."""
    if mode == "mixture":
        return [(H, w, r) for w, r in zip(SEGMENTS, RATES)]
    groups = len(SEGMENTS)
    return [(H // groups + (g < H % groups), w, r) for g, (w, r) in enumerate(zip(SEGMENTS, RATES))]


def dilated_flops(e: Experiment) -> float:
    flops = sum(4 * B * heads * (e.n / min(w, e.n)) * (min(w, e.n) / r) ** 2 * D
                for heads, w, r in head_configs(e.mode))
    return flops * (0.5 if e.causal else 1.0) * (2.5 if e.backward else 1.0)


def dense_flops(e: Experiment) -> float:
    return 4 * B * H * e.n * e.n * D * (0.5 if e.causal else 1.0) * (2.5 if e.backward else 1.0)


# --- implementations -------------------------------------------------------------------------


def ours(q, k, v, e: Experiment):
    spec = e.spec
    out, _ = dilated_attention_op(q, k, v, list(spec.segment_lengths), list(spec.dilation_rates),
                                  spec.mode, e.causal, None)
    return out


def dense(q, k, v, e: Experiment):
    return F.scaled_dot_product_attention(q, k, v, is_causal=e.causal)


def _dilated_rows(x, w, r, offset, n):
    """[B, h, n, D] -> [B * segments, h, rows, D] (a copy); n is a multiple of w here."""
    segments = x.unflatten(2, (n // w, w))[:, :, :, offset::r]
    return segments.transpose(1, 2).reshape(-1, x.shape[1], segments.shape[3], x.shape[-1])


def _scatter(y, batch, n, w, r, offset, fill):
    """Inverse of ``_dilated_rows``: [B * segments, h, rows, ...] -> [B, h, n, ...], ``fill``
    elsewhere (out of place, so autograd follows)."""
    y = y.unflatten(0, (batch, n // w)).transpose(1, 2)  # [B, h, segments, rows, ...]
    full = y.new_full(y.shape[:3] + (w,) + y.shape[4:], fill)
    full = full.index_copy(3, torch.arange(offset, w, r, device=y.device), y)
    return full.flatten(2, 3)


def head_group_eager(q, k, v, e: Experiment):
    n = q.shape[2]
    outs, start = [], 0
    for g, (heads, w, r) in enumerate(head_configs("head_groups")):
        hs = slice(start, start + heads)
        start += heads
        w, offset = min(w, n), g % r
        rows = [_dilated_rows(x[:, hs], w, r, offset, n) for x in (q, k, v)]
        y = F.scaled_dot_product_attention(*rows, is_causal=e.causal)
        outs.append(_scatter(y, q.shape[0], n, w, r, offset, 0.0))
    return torch.cat(outs, 1)


def _sdpa_with_lse(q, k, v, causal):
    """SDPA that also returns the log-sum-exp: cuDNN where it can, else flash."""
    if not q.requires_grad and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        try:
            out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False)
            return out, lse.reshape(q.shape[:3])
        except RuntimeError:
            pass
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    return out, lse.reshape(q.shape[:3])


def mixture_eager(q, k, v, e: Experiment):
    """Per config and offset: SDPA with lse on the gathered rows; configs merged in fp32."""
    n = q.shape[2]
    total_lse, merged = None, None
    for _, w, r in head_configs("mixture"):
        w = min(w, n)
        outs, lses, order = [], [], []
        for offset in range(min(r, H)):
            rows = [_dilated_rows(x[:, offset::r], w, r, offset, n) for x in (q, k, v)]
            y, y_lse = _sdpa_with_lse(*rows, e.causal)
            outs.append(_scatter(y, B, n, w, r, offset, 0.0))
            lses.append(_scatter(y_lse.unsqueeze(-1), B, n, w, r, offset, float("-inf")).squeeze(-1))
            order.extend(range(offset, H, r))
        inverse = torch.argsort(torch.tensor(order, device=q.device))
        out_i = torch.cat(outs, 1).index_select(1, inverse).float()
        lse_i = torch.cat(lses, 1).index_select(1, inverse)
        if merged is None:
            merged, total_lse = out_i, lse_i
            continue
        new = torch.logaddexp(total_lse, lse_i)
        merged = merged * torch.exp(total_lse - new).nan_to_num(0.0).unsqueeze(-1) \
            + out_i * torch.exp(lse_i - new).nan_to_num(0.0).unsqueeze(-1)
        total_lse = new
    return merged.to(q.dtype)


_FLEX_CACHE = {}


def flex(q, k, v, e: Experiment):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key = (e.mode, e.causal, q.shape[2])
    if key not in _FLEX_CACHE:
        n = q.shape[2]
        configs = head_configs(e.mode)
        if e.mode == "mixture":
            def count(b, h, qi, ki):
                total = 0
                for _, w, r in configs:  # unrolled: scalar constants per config
                    w, o = min(w, n), h % r
                    hit = ((qi // w) == (ki // w)) & ((qi % w) % r == o) & ((ki % w) % r == o)
                    total = total + hit.to(torch.int32)
                return total * (ki <= qi) if e.causal else total
        else:
            def count(b, h, qi, ki):
                total, start = 0, 0
                for g, (heads, w, r) in enumerate(configs):
                    w, o = min(w, n), g % r
                    in_group = (h >= start) & (h < start + heads)
                    start += heads
                    hit = in_group & ((qi // w) == (ki // w)) & ((qi % w) % r == o) & ((ki % w) % r == o)
                    total = total + hit.to(torch.int32)
                return total * (ki <= qi) if e.causal else total

        def mask_mod(b, h, qi, ki):
            return count(b, h, qi, ki) > 0

        def score_mod(score, b, h, qi, ki):  # count-weighted softmax (mixture)
            return score + torch.log(count(b, h, qi, ki).to(torch.float32))

        block_mask = create_block_mask(mask_mod, None, H, q.shape[2], q.shape[2], device=q.device,
                                       _compile=True)
        compiled = torch.compile(flex_attention, dynamic=False)
        _FLEX_CACHE[key] = (compiled, block_mask, score_mod if e.mode == "mixture" else None)
    compiled, block_mask, score_mod = _FLEX_CACHE[key]
    return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)


# --- running ---------------------------------------------------------------------------------


def inputs(n, requires_grad, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_(requires_grad)
            for _ in range(3)]


def bench(fn, e: Experiment, q, k, v):
    return median_ms(lambda: fn(q, k, v, e), [q, k, v], e.backward)


def _graph_ms(fn, e: Experiment, q, k, v):
    """The call replayed from a CUDA graph: GPU time without the host's cost of issuing it."""
    try:
        return graph_ms(lambda: fn(q, k, v, e), [q, k, v], e.backward)
    except Exception as exc:  # noqa: BLE001 - reported, the row keeps its other columns
        print(f"# graph capture of {e}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None


def peak_bytes(fn, e: Experiment, q, k, v):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if e.backward:
        fn(q, k, v, e).backward(torch.ones_like(q))
    else:
        with torch.no_grad():
            fn(q, k, v, e)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_small():
    """Ours (the kernels) against the float64 reference and the PyTorch implementation."""
    rows = []
    for mode in ("mixture", "head_groups"):
        for causal in (False, True):
            spec = DilatedSpec((256, 512, 1024), (1, 2, 4), mode)
            n = 3000
            q, k, v = (t.detach() for t in inputs(n, False, seed=1))
            out, lse = dilated_attention_op(q, k, v, [256, 512, 1024], [1, 2, 4], mode, causal, None)
            ref = dense_reference(*(t.double().cpu() for t in (q, k, v)), spec, is_causal=causal)
            pt, _ = dilated_attention_pytorch_op(q, k, v, [256, 512, 1024], [1, 2, 4], mode, causal, None)
            rows.append((mode, causal, rel_err(out.cpu(), ref), rel_err(pt.cpu(), ref)))
    return rows


BASELINES = {
    "dense": (dense, DENSE_MAX_N),
    "flex": (flex, FLEX_MAX_N),
}


def run_experiment(e: Experiment, results: list):
    q, k, v = inputs(e.n, e.backward)
    eager_name = "mix-eager" if e.mode == "mixture" else "hg-eager"
    eager_fn = mixture_eager if e.mode == "mixture" else head_group_eager
    impls = {"ours": (ours, None), eager_name: (eager_fn, EAGER_MAX_N), **BASELINES}
    with torch.no_grad():
        expected = ours(q, k, v, e)
    row = {"mode": e.mode, "causal": e.causal, "n": e.n, "pass": "fwd+bwd" if e.backward else "fwd",
           "flops": dilated_flops(e)}
    for name, (fn, max_n) in impls.items():
        if max_n is not None and e.n > max_n or name == "flex" and e.backward:
            continue  # flex: forward only (its targets are forward; its backward takes seconds)
        if name == "dense" and e.mode == "head_groups" and any(r["name"] == "dense" and r["n"] == e.n
                                                                and r["causal"] == e.causal
                                                                and r["pass"] == row["pass"]
                                                                for r in results):
            continue  # dense does not depend on the mode
        try:
            if name not in ("dense",):
                with torch.no_grad():
                    got = fn(q, k, v, e)
                err = rel_err(got, expected)
                if err > 2e-2:
                    raise AssertionError(f"{name} differs from ours: relative error {err:.2e}")
            ms = bench(fn, e, q, k, v)
            mem = peak_bytes(fn, e, q, k, v) if name == "ours" else None
            flops = dense_flops(e) if name == "dense" else dilated_flops(e)
            replay = _graph_ms(fn, e, q, k, v) if name == "ours" else None
            results.append({**row, "name": name, "ms": ms, "tflops": flops / ms / 1e9,
                            "peak_bytes": mem, "graph_ms": replay})
            print(json.dumps(results[-1]), flush=True)
        except Exception as exc:  # report and go on: one failing baseline must not hide the rest
            print(f"# {name} {row}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        torch.cuda.empty_cache()


def table(results):
    lines = ["| mode | causal | N | pass | ours ms | ours TFLOP/s | eager ms | ×eager | flex ms | ×flex | "
             "dense TFLOP/s | ours/dense TFLOP/s | graph ms | graph/dense TFLOP/s | peak B/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for r in results:
        keyed[(r["mode"], r["causal"], r["n"], r["pass"], r["name"])] = r
    for (mode, causal, n, p, name), r in keyed.items():
        if name != "ours":
            continue
        eager = keyed.get((mode, causal, n, p, "mix-eager" if mode == "mixture" else "hg-eager"))
        fl = keyed.get((mode, causal, n, p, "flex"))
        dn = keyed.get((mode, causal, n, p, "dense")) or keyed.get(("mixture", causal, n, p, "dense"))
        fmt = lambda x, f="{:.2f}": f.format(x) if x is not None else "—"
        lines.append(
            f"| {mode} | {int(causal)} | {n // K}K | {p} | {r['ms']:.3f} | {r['tflops']:.0f} | "
            f"{fmt(eager and eager['ms'], '{:.3f}')} | {fmt(eager and eager['ms'] / r['ms'])} | "
            f"{fmt(fl and fl['ms'], '{:.2f}')} | {fmt(fl and fl['ms'] / r['ms'], '{:.1f}')} | "
            f"{fmt(dn and dn['tflops'], '{:.0f}')} | {fmt(dn and r['tflops'] / dn['tflops'])} | "
            f"{fmt(r['graph_ms'], '{:.3f}')} | "
            f"{fmt(dn and r['graph_ms'] and r['flops'] / r['graph_ms'] / 1e9 / dn['tflops'])} | "
            f"{fmt(r['peak_bytes'] and r['peak_bytes'] / n, '{:.0f}')} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[16 * K, 64 * K, 256 * K, 1024 * K])
    parser.add_argument("--modes", nargs="*", default=["mixture", "head_groups"])
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--json", default=None, help="write every measurement here")
    args = parser.parse_args()
    if args.no_flex:
        BASELINES.pop("flex")

    q = torch.empty(1, 1, 1, D, device="cuda", dtype=DTYPE)
    assert uses_triton_kernels(q, q, q), "the benchmark needs the Triton path"
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    import triton
    meta = (f"device={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
            f"date={time.strftime('%Y-%m-%d')} commit={commit or 'n/a'}")
    print("#", meta, flush=True)
    checks = check_small()
    for mode, causal, err, pt_err in checks:
        print(f"# check {mode} causal={causal}: ours vs float64 {err:.2e}, "
              f"PyTorch impl {pt_err:.2e}", flush=True)
        assert err < 2 * pt_err + 1e-3, "kernels less accurate than allowed"

    results = []
    passes = [False] if args.no_backward else [False, True]
    causals = [False] if args.no_causal else [False, True]
    for n in args.n:
        for mode in args.modes:
            for causal in causals:
                for backward in passes:
                    run_experiment(Experiment(mode, causal, n, backward), results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "checks": checks, "results": results}, f, indent=1)
    from dilated_compile.ops._triton.tuning import autotune_mode, tuned_entries
    print(f"# configs: DILATED_COMPILE_AUTOTUNE={autotune_mode()} (auto: the shipped configs on a GPU "
          "the table knows, else autotuned)")
    for kernel, keys in tuned_entries().items():
        for key, config in keys.items():
            print(f"# autotuned {kernel} {key}: {config}")
    print()
    print(meta)
    print(table(results))


if __name__ == "__main__":
    sys.exit(main())
