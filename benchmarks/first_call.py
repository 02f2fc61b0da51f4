"""Seconds from the first call of a new shape class to a finished forward+backward, on one CUDA GPU.

Run it in a fresh process with an empty Triton cache, so that Triton's compilation counts::

    TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=. python benchmarks/first_call.py mixture causal 64
    TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=. python benchmarks/first_call.py block_sparse noncausal 128

kind: ``mixture`` / ``head_groups`` (spec (1024, 2048, 4096)/(1, 2, 4), a shape class the shipped
table does not hold) or ``block_sparse`` (local 3 + global 1 blocks of 128); bf16, B=1, H=16,
N=64K. Prints the first and the second call's seconds.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from dilated_compile import BlockSparseSpec, DilatedSpec, block_sparse, dilated_attention


def main() -> None:
    kind, causal, d = sys.argv[1], sys.argv[2] == "causal", int(sys.argv[3])
    x = [torch.randn(1, 16, 65536, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
         for _ in range(3)]
    torch.cuda.synchronize()

    def call():
        if kind == "block_sparse":
            with block_sparse(BlockSparseSpec(128, local_blocks=3, global_blocks=1)):
                return F.scaled_dot_product_attention(*x, is_causal=causal)
        return dilated_attention(*x, DilatedSpec((1024, 2048, 4096), (1, 2, 4), kind), is_causal=causal)

    times = []
    for _ in range(2):
        start = time.perf_counter()
        call().float().sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"FIRST_CALL kind={kind} causal={causal} D={d}: first {times[0]:.2f} s, second {times[1]:.3f} s")


if __name__ == "__main__":
    main()
