"""Block-sparse attention against dense SDPA and FlexAttention, on one CUDA GPU.

Block-sparse workload of BENCHMARKS.md: bf16, B=1, H=16, D=64 (and D=128 at 64K), block 128,
N in {16K, 64K, 256K}, causal and not, forward and forward+backward, two layouts:

  local     local_blocks=4 (a band of 9 blocks)
  bigbird   local_blocks=1, global_blocks=2, random_blocks=3, seed=0

Baselines in the same process, on the same inputs:
  dense     F.scaled_dot_product_attention, default backend (cuDNN on H100/H200), full N x N
  flex      FlexAttention with the same layout: create_block_mask at BLOCK_SIZE=128 from a
            mask_mod that reads the layout (and k <= q when causal), torch.compile(flex_attention)

Every implementation is checked before it is timed: ours against FlexAttention (and, at 16K,
against the PyTorch implementation). Effective TFLOP/s counts kept blocks only:
4 * B * H * nnz * bs^2 * D, minus the masked half of the diagonal blocks when causal; x2.5 for
forward+backward. ``--memory`` also runs forward+backward at 256K, 512K and 1M tokens and reports
the peak bytes per token of each (linear in N: the same at every length). ``--no-flex`` leaves
FlexAttention out (its first compile takes minutes per layout and length); ours is then checked
against the PyTorch implementation at every length.

"ours ms" is the op called eagerly; "graph ms" the same step replayed from a CUDA graph (the
GPU's time without the host's cost of issuing the launches, which sets an eager call's time at
16K); ``--compiled`` also times the call under ``torch.compile`` (Inductor launches the kernels,
as it does FlexAttention's), and "compiled x flex" compares like with like. Usage::

    PYTHONPATH=. python benchmarks/bench_block_sparse.py
    PYTHONPATH=. python benchmarks/bench_block_sparse.py --n 65536 --layouts local --no-causal
    PYTHONPATH=. python benchmarks/bench_block_sparse.py --n 16384 --compiled
    PYTHONPATH=. python benchmarks/bench_block_sparse.py --n --memory   # the memory check alone
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import time

import torch
import torch.nn.functional as F
from timing import graph_ms, median_ms

from dilated_compile import BlockSparseSpec
from dilated_compile.ops import block_sparse_attention_op
from dilated_compile.ops.block_sparse_attention import uses_block_sparse_kernels
from dilated_compile.ops.block_sparse_attention_pytorch import block_sparse_attention_pytorch_op
from dilated_compile.testing import block_layout

K = 1024
B, H, BLOCK = 1, 16, 128
DTYPE = torch.bfloat16
LAYOUTS = {
    "local": BlockSparseSpec(BLOCK, local_blocks=4),
    "bigbird": BlockSparseSpec(BLOCK, local_blocks=1, global_blocks=2, random_blocks=3, seed=0),
}
DENSE_MAX_N = 64 * K  # quadratic baselines stop here
FLEX_MAX_N = 256 * K


@dataclasses.dataclass(frozen=True)
class Experiment:
    layout: str
    n: int
    head_dim: int
    causal: bool
    backward: bool

    @property
    def spec(self) -> BlockSparseSpec:
        return LAYOUTS[self.layout]


def kept_blocks(e: Experiment) -> torch.Tensor:
    """[H, M, M] bool: the blocks the layout keeps (the definition, on the CPU)."""
    return block_layout(e.spec, H, e.n, is_causal=e.causal)


def useful_flops(e: Experiment) -> float:
    kept = kept_blocks(e)
    nnz = int(kept.sum())
    if e.causal:  # the diagonal blocks are half masked
        nnz -= 0.5 * int(kept.diagonal(dim1=1, dim2=2).sum())
    return 4 * B * nnz * BLOCK**2 * e.head_dim * (2.5 if e.backward else 1.0)


def dense_flops(e: Experiment) -> float:
    return 4 * B * H * e.n**2 * e.head_dim * (0.5 if e.causal else 1.0) * (2.5 if e.backward else 1.0)


def ours(q, k, v, e: Experiment):
    s = e.spec
    return block_sparse_attention_op(q, k, v, s.block_size, s.local_blocks, s.global_blocks,
                                     s.random_blocks, s.seed, s.layout, e.causal, None)[0]


_COMPILED = None


def ours_compiled(q, k, v, e: Experiment):
    """``ours`` under ``torch.compile`` (one graph per experiment: the pattern is a constant)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(ours, fullgraph=True, dynamic=False)
    return _COMPILED(q, k, v, e)


def dense(q, k, v, e: Experiment):
    return F.scaled_dot_product_attention(q, k, v, is_causal=e.causal)


_FLEX_CACHE: dict = {}


def flex(q, k, v, e: Experiment):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key = (e.layout, e.n, e.causal)
    if key not in _FLEX_CACHE:
        layout = kept_blocks(e).to(q.device)

        def mask_mod(b, h, qi, ki):
            keep = layout[h, qi // BLOCK, ki // BLOCK]
            return keep & (ki <= qi) if e.causal else keep

        block_mask = create_block_mask(mask_mod, None, H, e.n, e.n, device=q.device,
                                       BLOCK_SIZE=BLOCK, _compile=True)
        _FLEX_CACHE[key] = (block_mask, torch.compile(flex_attention, dynamic=False))
    block_mask, compiled = _FLEX_CACHE[key]
    return compiled(q, k, v, block_mask=block_mask)


def inputs(e: Experiment, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, e.n, e.head_dim, device="cuda", dtype=DTYPE, generator=g)
            .requires_grad_(e.backward) for _ in range(3)]


def bench(fn, e: Experiment, q, k, v) -> float:
    return median_ms(lambda: fn(q, k, v, e), [q, k, v], e.backward)


def replayed(e: Experiment, q, k, v) -> float | None:
    """Ours replayed from a CUDA graph: the GPU's time without the host's cost of issuing it."""
    try:
        return graph_ms(lambda: ours(q, k, v, e), [q, k, v], e.backward)
    except Exception as exc:  # noqa: BLE001 - reported, the row keeps its other columns
        print(f"# graph capture of {e}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(e: Experiment, q, k, v, stage=lambda what: None, with_flex=True) -> dict:
    """Ours against FlexAttention (same layout) and, at 16K or without FlexAttention, the
    PyTorch implementation."""
    with torch.no_grad():
        got = ours(q, k, v, e)
        errors = {}
        if with_flex and e.n <= FLEX_MAX_N:
            stage("flex's first call (block mask, compilation)")
            errors["vs_flex"] = rel_err(got, flex(q, k, v, e))
        if e.n <= 16 * K or not with_flex:
            stage("the PyTorch implementation")
            s = e.spec
            ref = block_sparse_attention_pytorch_op(q, k, v, s.block_size, s.local_blocks,
                                                    s.global_blocks, s.random_blocks, s.seed,
                                                    s.layout, e.causal, None)[0]
            errors["vs_pytorch"] = rel_err(got, ref)
    return errors


def peak_bytes_per_token(n: int) -> float:
    e = Experiment("bigbird", n, 64, True, True)
    q, k, v = inputs(e)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ours(q, k, v, e).backward(torch.randn_like(q))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / n


def main():
    import triton

    torch._dynamo.config.recompile_limit = 64  # one Flex graph per layout and length
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[16 * K, 64 * K, 256 * K])
    parser.add_argument("--layouts", nargs="+", default=sorted(LAYOUTS))
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None,
                        help="head dims (default: 64, and 64 and 128 at 64K)")
    parser.add_argument("--memory", action="store_true",
                        help="also fwd+bwd peak memory at 256K, 512K and 1M tokens")
    parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention out")
    parser.add_argument("--compiled", action="store_true",
                        help="also time ours under torch.compile (one compile per row)")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = (f"device={torch.cuda.get_device_name()} torch={torch.__version__} "
            f"triton={triton.__version__} date={time.strftime('%Y-%m-%d')} commit={commit or 'n/a'}")
    print("#", meta, flush=True)

    experiments = [
        Experiment(layout, n, d, causal, backward)
        for layout in args.layouts for n in args.n
        for d in (args.head_dims or ((64, 128) if n == 64 * K else (64,)))
        for causal in ((False,) if args.no_causal else (False, True))
        for backward in ((False,) if args.no_backward else (False, True))
    ]
    rows = []
    started = time.perf_counter()

    def stage(what: str) -> None:  # where the time goes (first calls compile and build masks)
        print(f"#   {time.perf_counter() - started:7.1f} s  {what}", flush=True)

    for e in experiments:
        q, k, v = inputs(e)
        assert uses_block_sparse_kernels(q, k, v, BLOCK), "the kernels do not run this call"
        stage(f"{e}: checking")
        errors = check(e, q, k, v, stage, with_flex=not args.no_flex)
        if any(not err < 2e-2 for err in errors.values()):
            raise SystemExit(f"{e}: results off {errors}; not timing")
        stage("timing ours")
        row = dict(e=e, errors=errors, ours=bench(ours, e, q, k, v), graph=replayed(e, q, k, v))
        if args.compiled:
            stage("compiling ours")
            with torch.no_grad():
                errors["compiled_vs_eager"] = rel_err(ours_compiled(q, k, v, e), ours(q, k, v, e))
            if not errors["compiled_vs_eager"] < 1e-2:
                raise SystemExit(f"{e}: compiled differs from eager {errors}; not timing")
            stage("timing ours compiled")
            row["compiled"] = bench(ours_compiled, e, q, k, v)
        if e.n <= DENSE_MAX_N:
            stage("timing dense")
            row["dense"] = bench(dense, e, q, k, v)
        if e.n <= FLEX_MAX_N and not args.no_flex:
            stage("timing flex")
            row["flex"] = bench(flex, e, q, k, v)
        rows.append(row)
        print("#", {**row, "e": dataclasses.asdict(e)}, flush=True)

    print()
    print(meta)
    print("| layout | N | D | causal | pass | ours ms | TFLOP/s | dense ms | dense TFLOP/s | "
          "x dense TFLOP/s | flex ms | x flex | graph ms | compiled ms | compiled x flex |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["e"]
        tflops = useful_flops(e) / r["ours"] / 1e9
        dense_ms, flex_ms, compiled_ms = r.get("dense"), r.get("flex"), r.get("compiled")
        dense_tflops = dense_flops(e) / dense_ms / 1e9 if dense_ms else None
        fmt = lambda x, f: f.format(x) if x is not None else "—"  # noqa: E731
        print(f"| {e.layout} | {e.n // K}K | {e.head_dim} | {e.causal} | "
              f"{'fwd+bwd' if e.backward else 'fwd'} | {r['ours']:.3f} | {tflops:.0f} | "
              f"{fmt(dense_ms, '{:.3f}')} | {fmt(dense_tflops, '{:.0f}')} | "
              f"{fmt(tflops / dense_tflops if dense_tflops else None, '{:.2f}')} | "
              f"{fmt(flex_ms, '{:.3f}')} | {fmt(flex_ms / r['ours'] if flex_ms else None, '{:.2f}')} | "
              f"{fmt(r['graph'], '{:.3f}')} | {fmt(compiled_ms, '{:.3f}')} | "
              f"{fmt(flex_ms / compiled_ms if flex_ms and compiled_ms else None, '{:.2f}')} |")
    if args.memory:
        print()
        for n in (256 * K, 512 * K, 1024 * K):
            per_token = peak_bytes_per_token(n)
            print(f"fwd+bwd peak memory, bigbird causal, {n // K}K tokens: {per_token:.0f} B/token",
                  flush=True)


if __name__ == "__main__":
    main()
