"""What the dilated kernels' launchers cost the host per call, on any machine.

The forward and backward launchers run on tiny CPU tensors with the kernel launches replaced by
the part of a launch that is ours (``tuning.select`` against the shipped H200 table, and the
grid), so the time is the launchers' own Python: planning the launches, their geometry, the
config choice, allocations. Triton's launch and the op's dispatch come on top on a GPU
(``bench_dilated.py``'s "graph ms" column shows the whole host cost). Usage::

    python benchmarks/host_cost.py
"""

from __future__ import annotations

import time
from unittest import mock

import torch

from dilated_compile.ops._triton import dilated_attention as kernels
from dilated_compile.ops._triton import tuning

SEGMENTS, RATES = [2048, 4096, 8192, 16384], [1, 2, 4, 8]
CALLS = 200


def _our_part_of_a_launch(name, grid, *args, **kwargs):
    tuning.select(name, torch.device("cuda", 0), args, kwargs)
    grid({"BLOCK_M": 64, "BLOCK_N": 64})


def main():
    q = torch.randn(1, 16, 64, 64, dtype=torch.bfloat16)
    lse = q[..., 0].float()
    print(f"torch={torch.__version__}; microseconds per call, launches stubbed")
    print("| mode | forward | backward |\n|---|---|---|")
    with mock.patch.object(kernels, "launch_tuned", _our_part_of_a_launch), \
            mock.patch.object(kernels, "launch_delta", lambda *a: None), \
            mock.patch.object(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200"), \
            mock.patch.object(torch.cuda, "current_device", lambda: 0):
        for mode in ("mixture", "head_groups"):
            args = (SEGMENTS, RATES, mode, False, 0.125)
            for _ in range(5):  # warm the memoized choices
                kernels.forward(q, q, q, *args)
                kernels.backward(q, q, q, q, q, lse, None, *args)
            start = time.perf_counter()
            for _ in range(CALLS):
                kernels.forward(q, q, q, *args)
            middle = time.perf_counter()
            for _ in range(CALLS):
                kernels.backward(q, q, q, q, q, lse, None, *args)
            end = time.perf_counter()
            print(f"| {mode} | {(middle - start) / CALLS * 1e6:.0f} | {(end - middle) / CALLS * 1e6:.0f} |")


if __name__ == "__main__":
    main()
