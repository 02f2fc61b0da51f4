"""What each kernel's inner loop costs per iteration, read off its sm_90 machine code (no GPU).

Compiles the dilated and block-sparse kernels for sm_90 (the H100/H200) with the configs the
shipped table holds (read from it) for the standard workload (bf16, head dim 64, 2048 rows per segment /
blocks of 128), then counts the instructions of every loop that holds a tensor-core product
(HGMMA). Per-score work shows as floating-point instructions per iteration (FSEL: a select;
MUFU: exp2); LDL/STL are spills to local memory. Triton compiles here with the installed
version, which may differ from the GPU machine's; the counts are a guide, the GPU's timing the
judge. Usage::

    PYTHONPATH=. python benchmarks/kernel_sass.py
    PYTHONPATH=. python benchmarks/kernel_sass.py --kernels dilated_bwd_dkdv --causal
"""

from __future__ import annotations

import argparse
import json

from dilated_compile.ops._triton import block_sparse_attention, dilated_attention  # noqa: F401
from dilated_compile.ops._triton.offline import loop_bodies, sass
from dilated_compile.ops._triton.tuning import REGISTRY, TABLE_PATH

# Registered kernel -> (constexprs, the leading fields of its standard tuning keys given
# causality): the dilated keys start (rows per segment, D, Dv, causal, mask, fewer queries,
# merge/accumulate), the block-sparse ones (D, Dv, causal, mask).
STANDARD = {
    "dilated_fwd": (dict(MERGE=True), lambda causal: [2048, 64, 64, causal, False, False, True]),
    "dilated_bwd_dq": (dict(ACCUMULATE=True), lambda causal: [2048, 64, 64, causal, False, False, True]),
    "dilated_bwd_dkdv": (dict(ACCUMULATE=True),
                         lambda causal: [2048, 64, 64, causal, False, False, True]),
    # The workload's lengths are multiples of the block: the kernels built without bounds checks.
    "block_sparse_fwd_bs128": (dict(WHOLE_BLOCKS=True), lambda causal: [64, 64, causal, False]),
    "block_sparse_bwd_dq_bs128": (dict(WHOLE_BLOCKS=True), lambda causal: [64, 64, causal, False]),
    "block_sparse_bwd_dkdv_bs128": (dict(QUERIES_WHOLE=True), lambda causal: [64, 64, causal, False]),
}


def shipped_config(name: str, key_start: list, device: str = "NVIDIA H200") -> tuple:
    """(constexprs: BLOCK_M, BLOCK_N and any others, warps, stages) of the shipped table's first
    entry for kernel ``name`` on ``device`` whose tuning key starts with ``key_start``."""
    entries = json.loads(TABLE_PATH.read_text())["devices"][device]["kernels"][name]
    for key, config in entries.items():
        if json.loads(key)[: len(key_start)] == key_start:
            return config["kwargs"], config["num_warps"], config["num_stages"]
    raise KeyError(f"{name}: no shipped config for a key starting {key_start}")


SHOWN = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FSEL", "F2FP", "LDS", "LDGSTS", "LDL", "STL")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=list(STANDARD), choices=list(STANDARD))
    parser.add_argument("--causal", action="store_true", help="only the causal variants")
    args = parser.parse_args()
    print("| kernel | causal | BLOCK_M×BLOCK_N, warps, stages | loop | instructions | "
          + " | ".join(SHOWN) + " |")
    print("|---" * (5 + len(SHOWN)) + "|")
    for name in args.kernels:
        constexprs, key_start = STANDARD[name]
        for causal in (True,) if args.causal else (False, True):
            config, warps, stages = shipped_config(name, key_start(causal))
            text = sass(REGISTRY[name].fn,
                        dict(constexprs, IS_CAUSAL=causal, SPLIT_DENSE=not causal, **config), warps,
                        stages)
            tile = f"{config['BLOCK_M']}×{config['BLOCK_N']}" + (
                " by query" if config.get("BY_QUERY") else "")
            loops = [body for body in loop_bodies(text) if body["HGMMA"]]
            for index, body in enumerate(loops):
                counts = " | ".join(str(body[op]) for op in SHOWN)
                print(f"| {name} | {causal} | {tile}, {warps}, {stages} | {index} | "
                      f"{sum(body.values())} | {counts} |", flush=True)


if __name__ == "__main__":
    main()
