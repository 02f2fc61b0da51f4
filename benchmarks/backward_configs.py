"""The backward alone with each dk/dv config, against the shipped table, on one CUDA GPU.

For the standard workload (dilated: both modes) or the block-sparse one (local and bigbird,
blocks of 128), causal and not, at one length and head dim 64: one forward with the Triton
kernels, then the backward launcher (dq, dk/dv, Delta; no autograd) timed with the shipped
configs, then with each candidate of the dk/dv kernel in turn (the other kernels keep the
table's configs: ``tuning.retune`` makes the dk/dv kernel alone take its candidate list, here
one config at a time). Every run's gradients are compared with the shipped run's (relative L2);
the first call of each config, Triton compilation included, is reported too. Candidates
marked "by query" lay the score tiles [queries, keys] (``BY_QUERY``). Usage::

    PYTHONPATH=. python benchmarks/backward_configs.py --family dilated --n 65536
    PYTHONPATH=. python benchmarks/backward_configs.py --family block_sparse
"""

from __future__ import annotations

import argparse
import time

import torch
import triton
from triton.testing import do_bench

from dilated_compile.ops._triton import block_sparse_attention, dilated_attention
from dilated_compile.ops._triton import tuning

K = 1024
H, D = 16, 64
SEGMENTS, RATES = [2048, 4096, 8192, 16384], [1, 2, 4, 8]
LAYOUTS = {"local": (128, 4, 0, 0, 0), "bigbird": (128, 1, 2, 3, 0)}  # block, local, global, random, seed


def _patterns(family: str):
    """(label, Triton module, the pattern's launcher arguments, dk/dv kernel name) per pattern."""
    if family == "dilated":
        for mode in ("mixture", "head_groups"):
            yield mode, dilated_attention, (SEGMENTS, RATES, mode), "dilated_bwd_dkdv"
    else:
        for name, (block, local, global_, random, seed) in LAYOUTS.items():
            yield (name, block_sparse_attention, (block, local, global_, random, seed, None),
                   f"block_sparse_bwd_dkdv_bs{block}")


def _label(config: triton.Config) -> str:
    kw = config.kwargs
    return (f"{kw['BLOCK_M']}×{kw['BLOCK_N']}{' by query' if kw.get('BY_QUERY') else ''}, "
            f"{config.num_warps}w, {config.num_stages}s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("dilated", "block_sparse"), default="dilated")
    parser.add_argument("--n", type=int, default=64 * K)
    args = parser.parse_args()
    if tuning.autotune_mode() != "auto":
        parser.error("unset DILATED_COMPILE_AUTOTUNE: the shipped row is the table's configs")
    print(f"# device={torch.cuda.get_device_name()} torch={torch.__version__} "
          f"triton={triton.__version__} N={args.n} D={D} H={H} bf16", flush=True)
    rows = []
    for label, module, pattern, name in _patterns(args.family):
        autotuner = tuning.REGISTRY[name]
        candidates = list(autotuner.configs)
        for causal in (False, True):
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, grad_out = (torch.randn(1, H, args.n, D, device="cuda", dtype=torch.bfloat16,
                                             generator=g) for _ in range(4))
            call = (*pattern, causal, D ** -0.5)
            out, lse = module.forward(q, k, v, *call)
            shipped = None
            for config in [None, *candidates]:
                if config is not None:  # this dk/dv config alone (one config: no benchmarking)
                    tuning.retune((name,))
                    autotuner.configs = [config]
                try:
                    start = time.perf_counter()
                    grads = module.backward(grad_out, q, k, v, out, lse, None, *call)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - start
                    ms = do_bench(lambda: module.backward(grad_out, q, k, v, out, lse, None, *call),
                                  warmup=10, rep=50, return_mode="median")
                finally:
                    autotuner.configs = candidates
                    tuning.retune(())
                shipped = shipped or grads
                diff = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                           for a, b in zip(grads, shipped))
                rows.append((label, causal, "shipped" if config is None else _label(config), ms,
                             diff, first))
                print(rows[-1], flush=True)
    print("| pattern | causal | dk/dv config | backward ms | rel. L2 vs shipped | first call s |")
    print("|---|---|---|---|---|---|")
    for label, causal, config, ms, diff, first in rows:
        print(f"| {label} | {int(causal)} | {config} | {ms:.3f} | {diff:.1e} | {first:.1f} |")


if __name__ == "__main__":
    main()
