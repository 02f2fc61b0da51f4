"""Sequence-parallel attention on several GPUs (the sequence-parallel workload of BENCHMARKS.md).

Run with torchrun, one process per GPU (NCCL)::

    torchrun --nproc-per-node 2 benchmarks/bench_sequence_parallel.py            # weak scaling
    torchrun --nproc-per-node 2 benchmarks/bench_sequence_parallel.py --per-rank 65536 262144 \\
        --patterns dilated dense_causal --strategies all_gather ring
    torchrun --nproc-per-node 2 benchmarks/bench_sequence_parallel.py --smoke    # CPU, gloo

Workload: bf16, B=1, H=16, D=64, causal, zigzag layout; patterns ``dilated`` (LongNet's four
configs, mixture), ``dilated_hg`` (head_groups), ``dense_causal`` and ``block_sparse_local``
(local_blocks=4 of 128); every strategy that serves the pattern. ``--per-rank``: positions per
rank (weak scaling: N grows with the ranks); ``--total`` fixes N instead (strong scaling). For
each row:

- correctness first, at ``--check-per-rank`` positions per rank: every rank's output and input
  gradients against the single-GPU op on the gathered sequence (rank 0 computes it);
- time per call (forward, and forward+backward), the slowest rank's median of CUDA-event timings;
- effective TFLOP/s per GPU (useful work only, BENCHMARKS.md) and the bytes this rank received in
  one forward (the library's counters; the backward moves as much again, the ring more: the
  formulas of docs/sequence_parallel.md);
- the ratio to one GPU running the same pattern on ``N / W`` tokens (weak-scaling efficiency);
- baselines in the same process: torch's ``context_parallel`` (dense causal, CUDA only) and the
  all-gather of K and V followed by the local op (``gather+op``).

The last lines print a table (with the device, versions and commit) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dilated_compile import BlockSparseSpec, DilatedSpec, gather_sequence, sequence_parallel, shard_sequence
from dilated_compile.attention_family import family_of_spec
from dilated_compile.distributed.plan import pattern_attention

K = 1024
H, D = 16, 64
PATTERNS = {
    "dilated": DilatedSpec((2048, 4096, 8192, 16384), (1, 2, 4, 8)),
    "dilated_hg": DilatedSpec((2048, 4096, 8192, 16384), (1, 2, 4, 8), "head_groups"),
    "dense_causal": None,
    "block_sparse_local": BlockSparseSpec(128, local_blocks=4),
}
SMOKE_PATTERNS = {
    "dilated": DilatedSpec((16, 32), (1, 2)),
    "dilated_hg": DilatedSpec((16, 32), (1, 2), "head_groups"),
    "dense_causal": None,
    "block_sparse_local": BlockSparseSpec(8, local_blocks=1),
}
STRATEGIES = ("all_gather", "all_to_all", "ring")
CAUSAL = True  # language-model training: every pattern causal (zigzag balances the ranks)


@dataclasses.dataclass
class Setting:
    device: torch.device
    dtype: torch.dtype
    patterns: dict
    layout: str = "zigzag"


def serves(strategy: str, spec) -> bool:
    return not (strategy == "ring" and isinstance(spec, DilatedSpec))


def attend(spec, q, k, v, causal: bool, strategy: str | None, layout: str) -> torch.Tensor:
    """This rank's rows (``strategy``: inside ``sequence_parallel``), or the single-GPU op."""
    def sdpa():
        inner = None if spec is None else family_of_spec(spec).region(spec)
        if inner is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with inner:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    if strategy is None:
        return sdpa()
    with sequence_parallel(strategy=strategy, layout=layout):
        return sdpa()


def gather_then_op(spec, q, k, v, causal: bool, layout: str) -> torch.Tensor:
    """Baseline: all-gather K and V, then the op on this rank's query rows (causal rows are the
    last rows of the prefix up to their chunk; zigzag: one call per chunk)."""
    keys, values = gather_sequence(k, layout=layout), gather_sequence(v, layout=layout)
    world, rank, n = dist.get_world_size(), dist.get_rank(), keys.shape[2]
    c = -(-n // (2 * world))
    outs, row = [], 0
    for chunk in (rank, 2 * world - 1 - rank):
        a, b = min(chunk * c, n), min((chunk + 1) * c, n)
        if a == b:
            continue
        queries = q[:, :, row:row + b - a]
        row += b - a
        # The op itself: SDPA refuses is_causal with fewer queries than keys (its alignment).
        outs.append(pattern_attention(spec, queries, keys[:, :, :b], values[:, :, :b], causal, None, None)[0])
    return torch.cat(outs, dim=2)


def context_parallel_dense(q, k, v) -> torch.Tensor:
    """Baseline: torch's context_parallel on the full q/k/v (dense causal ring, CUDA)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flops(spec, n: int, causal: bool, backward: bool) -> float:
    """Useful work of the whole sequence (BENCHMARKS.md), halved when causal; x2.5 fwd+bwd."""
    if spec is None:
        work = 4 * H * n * n * D
    elif isinstance(spec, DilatedSpec):
        configs = list(zip(spec.segment_lengths, spec.dilation_rates))
        per = [(n / w) * (w / r) ** 2 * 4 * D for w, r in configs]
        work = H * sum(per) if spec.mode == "mixture" else H / len(configs) * sum(per)
    else:
        blocks = -(-n // spec.block_size)
        kept = sum(min(blocks, i + spec.local_blocks + 1) - max(0, i - spec.local_blocks)
                   for i in range(blocks))
        work = 4 * H * kept * spec.block_size ** 2 * D
    return work * (0.5 if causal else 1.0) * (2.5 if backward else 1.0)


def timed(fn, inputs, backward: bool, device: torch.device, reps: int) -> float:
    """The slowest rank's median milliseconds of ``fn()`` (and its backward)."""
    grad = None
    times = []
    for i in range(reps + 2):  # two warm-up calls
        for t in inputs:
            t.grad = None
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if backward:
            out = fn()
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
        else:
            with torch.no_grad():
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def bytes_per_call(fn, inputs, backward: bool) -> int:
    """Bytes this rank receives in one call (the library's counters)."""
    before = sum(v for k, v in counters["dilated_compile"].items() if k.startswith("sequence_parallel_bytes"))
    for t in inputs:
        t.grad = None
    out = fn()
    if backward:
        out.backward(torch.ones_like(out))
    after = sum(v for k, v in counters["dilated_compile"].items() if k.startswith("sequence_parallel_bytes"))
    return int(after - before)


def check(setting: Setting, name: str, strategy: str, per_rank: int) -> float:
    """Max relative error (outputs and input gradients, every rank) against the single-GPU op on
    the gathered sequence."""
    spec, causal = setting.patterns[name], CAUSAL
    world = dist.get_world_size()
    n = per_rank * world
    generator = torch.Generator(device="cpu").manual_seed(0)
    full = [torch.randn(1, H, n, D, generator=generator).to(setting.device, setting.dtype) for _ in range(3)]
    shards = [shard_sequence(x, layout=setting.layout).detach().requires_grad_() for x in full]
    out = attend(spec, *shards, causal, strategy, setting.layout)
    grad_full = torch.randn(1, H, n, D, generator=generator).to(setting.device, setting.dtype)
    out.backward(shard_sequence(grad_full, layout=setting.layout))
    reference = [x.detach().clone().requires_grad_() for x in full]
    ref = attend(spec, *reference, causal, None, setting.layout)
    ref.backward(grad_full)
    pairs = [(out, ref)] + [(s.grad, x.grad) for s, x in zip(shards, reference)]
    errors = []
    for got, want in pairs:
        want = shard_sequence(want, layout=setting.layout)
        errors.append(((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item())
    worst = torch.tensor([max(errors)], dtype=torch.float64, device=setting.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def run_row(setting: Setting, name: str, strategy: str, per_rank: int, reps: int, check_per_rank: int,
            context_parallel_too: bool) -> dict:
    spec, causal = setting.patterns[name], CAUSAL
    world = dist.get_world_size()
    n = per_rank * world
    row = {"pattern": name, "strategy": strategy, "world": world, "per_rank": per_rank, "n": n}
    row["error"] = check(setting, name, strategy, check_per_rank)
    make = lambda: torch.randn(1, H, per_rank, D, device=setting.device, dtype=setting.dtype,  # noqa: E731
                               requires_grad=True)
    q, k, v = make(), make(), make()
    single = [torch.randn(1, H, per_rank, D, device=setting.device, dtype=setting.dtype, requires_grad=True)
              for _ in range(3)]
    for backward in (False, True):
        suffix = "fwd+bwd" if backward else "fwd"
        ms = timed(lambda: attend(spec, q, k, v, causal, strategy, setting.layout), [q, k, v], backward,
                   setting.device, reps)
        row[f"ms {suffix}"] = ms
        row[f"TFLOP/s/GPU {suffix}"] = flops(spec, n, causal, backward) / world / ms / 1e9
        if not backward:
            row["bytes fwd"] = bytes_per_call(
                lambda: attend(spec, q, k, v, causal, strategy, setting.layout), [q, k, v], False)
        # One GPU on N / W tokens: the same work per GPU without communication.
        one = timed(lambda: attend(spec, *single, causal, None, setting.layout), single, backward,
                    setting.device, reps)
        row[f"efficiency {suffix}"] = one * flops(spec, n, causal, backward) / world / flops(
            spec, per_rank, causal, backward) / ms
        row[f"gather+op ms {suffix}"] = timed(
            lambda: gather_then_op(spec, q, k, v, causal, setting.layout), [q, k, v], backward,
            setting.device, reps)
        if context_parallel_too and spec is None and setting.device.type == "cuda":
            # It shards its buffers in place: each call gets fresh copies (their copy is timed too).
            full = [torch.randn(1, H, n, D, device=setting.device, dtype=setting.dtype) for _ in range(3)]
            try:
                row[f"context_parallel ms {suffix}"] = timed(
                    lambda: context_parallel_dense(*[x.clone().requires_grad_(backward) for x in full]),
                    [], backward, setting.device, reps)
            except Exception as error:  # reported in the table, not dropped
                row[f"context_parallel ms {suffix}"] = f"failed: {type(error).__name__}: {error}"[:120]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-rank", type=int, nargs="+", default=[64 * K, 256 * K])
    parser.add_argument("--total", type=int, nargs="*", default=None, help="strong scaling: fixed N")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--check-per-rank", type=int, default=8 * K)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-context-parallel", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny sizes, float32")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        setting = Setting(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, PATTERNS)
    else:
        setting = Setting(torch.device("cpu"), torch.float32, SMOKE_PATTERNS)
        args.per_rank, args.check_per_rank, args.reps = [48], 24, 1
        args.total = None
    sizes = [n // world for n in args.total] if args.total else args.per_rank
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = (f"device={torch.cuda.get_device_name() if cuda else 'cpu'} x{world} backend={dist.get_backend()} "
            f"torch={torch.__version__} date={time.strftime('%Y-%m-%d')} commit={commit or 'n/a'} "
            f"layout={setting.layout}")
    rows = []
    try:
        for name in args.patterns:
            for strategy in args.strategies:
                if not serves(strategy, setting.patterns[name]):
                    continue
                for per_rank in sizes:
                    row = run_row(setting, name, strategy, per_rank, args.reps, args.check_per_rank,
                                  not args.no_context_parallel)
                    rows.append(row)
                    if rank == 0:
                        print("#", row, flush=True)
    finally:
        if rank == 0:
            print()
            print(meta)
            print(table(rows))
        dist.barrier()
        dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    head = ("| pattern | strategy | W | N per rank | N | rel err | fwd ms | fwd TFLOP/s/GPU | fwd eff | "
            "fwd+bwd ms | fwd+bwd TFLOP/s/GPU | fwd+bwd eff | bytes in/rank fwd | "
            "gather+op fwd+bwd ms | context_parallel fwd+bwd ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cp = r.get("context_parallel ms fwd+bwd")
        cp = "—" if cp is None else cp if isinstance(cp, str) else f"{cp:.2f}"
        lines.append(
            f"| {r['pattern']} | {r['strategy']} | {r['world']} | {r['per_rank']} | {r['n']} | "
            f"{r['error']:.1e} | "
            f"{r['ms fwd']:.2f} | {r['TFLOP/s/GPU fwd']:.0f} | {r['efficiency fwd']:.2f} | "
            f"{r['ms fwd+bwd']:.2f} | {r['TFLOP/s/GPU fwd+bwd']:.0f} | {r['efficiency fwd+bwd']:.2f} | "
            f"{r['bytes fwd']:,} | {r['gather+op ms fwd+bwd']:.2f} | "
            f"{cp} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
