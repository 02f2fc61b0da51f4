"""How the benchmark scripts time a call: the median of ``triton.testing.do_bench`` (CUDA
events, warm-up first), forward alone under ``no_grad`` or forward+backward (BENCHMARKS.md);
``graph_ms`` times the same step replayed from a CUDA graph, which leaves out the host's cost of
issuing it (what ``torch.compile(mode="reduce-overhead")`` or a captured training step pays)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def median_ms(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], backward: bool) -> float:
    """Milliseconds of one ``forward()`` (``backward``: and its backward from a random gradient,
    the inputs' ``.grad`` cleared before each step)."""
    from triton.testing import do_bench

    return do_bench(_step(forward, inputs, backward), warmup=25, rep=100, return_mode="median")


def graph_ms(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], backward: bool) -> float:
    """Milliseconds of one replay of ``median_ms``'s step captured in a CUDA graph."""
    from triton.testing import do_bench

    step = _step(forward, inputs, backward)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as CUDA graphs require
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def _step(forward, inputs, backward):
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
    return step
