"""How the benchmark scripts time a call: the median of ``triton.testing.do_bench`` (CUDA
events, warm-up first), forward alone under ``no_grad`` or forward+backward (BENCHMARKS.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def median_ms(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], backward: bool) -> float:
    """Milliseconds of one ``forward()`` (``backward``: and its backward from a random gradient,
    the inputs' ``.grad`` cleared before each step)."""
    from triton.testing import do_bench

    if backward:
        grad = None

        def step():
            nonlocal grad
            for t in inputs:
                t.grad = None
            out = forward()
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
    else:
        def step():
            with torch.no_grad():
                forward()
    return do_bench(step, warmup=25, rep=100, return_mode="median")
