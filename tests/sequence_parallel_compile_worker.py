"""Worker side of tests/test_sequence_parallel_compile.py: sequence_parallel under torch.compile,
run by ``sequence_parallel_worker.run_group("sequence_parallel_compile_worker:compiled", ...)``.

Every function puts several SDPA calls in one compiled function (one compile serves them all:
compiles dominate the time on small machines) and compares the compiled outputs and gradients
with eager mode (exactly: the same op runs in both) and with the float64 ``dense_reference`` of
the gathered sequence.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import (
    BlockSparseSpec, DilatedSpec, block_sparse, dilated, sequence_parallel, shard_sequence,
)
from dilated_compile.ops import annotation_op, sequence_parallel_attention_op
from dilated_compile.testing import dense_reference

TOL = {"atol": 1e-9, "rtol": 1e-7}
B, HQ, HKV, N, D, DV = 1, 4, 2, 13, 4, 3  # GQA; 13 positions: uneven shards on 2 ranks

DILATED = DilatedSpec((4, 8), (1, 2))
# An explicit layout (a tensor the annotation carries beside its payload: the diagonal and the
# block before it) and a random block per row.
_EYE = torch.eye(5, dtype=torch.bool)
BLOCK_SPARSE = BlockSparseSpec(3, local_blocks=0, random_blocks=1, seed=1, layout=_EYE | _EYE.roll(1, 0))

# (pattern, is_causal, mask): dense, dilated and block-sparse, causal and not; the non-causal
# dense and dilated calls with a mask over every key (it travels on the annotation).
CALLS = [(None, False, "bool"), (None, True, None), (DILATED, False, "float"), (DILATED, True, None),
         (BLOCK_SPARSE, False, None), (BLOCK_SPARSE, True, None)]


def _region(spec):
    if spec is None:
        return contextlib.nullcontext()
    return dilated(spec) if isinstance(spec, DilatedSpec) else block_sparse(spec)


def _inputs(layout: str):
    """Full float64 q/k/v, masks and loss weights (the same on every rank), and this rank's
    shards of them."""
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(B, h, N, d, generator=gen, dtype=torch.float64)
            for h, d in ((HQ, D), (HKV, D), (HKV, DV))]
    masks = {"bool": torch.rand(B, 1, N, N, generator=gen) > 0.3,
             "float": torch.randn(1, HQ, N, N, generator=gen, dtype=torch.float64)}
    weights = [torch.randn(B, HQ, N, DV, generator=gen, dtype=torch.float64) for _ in CALLS]
    shard = lambda x: shard_sequence(x, layout=layout)  # noqa: E731
    local = {"masks": {name: shard(m) for name, m in masks.items()},
             "weights": [shard(w) for w in weights]}
    return full, masks, weights, [shard(x) for x in full], local


def _attend_all(q, k, v, masks):
    """Every call of ``CALLS`` (inside an open ``sequence_parallel``)."""
    outs = []
    for spec, causal, mask in CALLS:
        with _region(spec):
            outs.append(F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else masks[mask], is_causal=causal,
                enable_gqa=True))
    return outs


def _run(fn, shards, local):
    """Outputs and q/k/v gradients of ``fn`` on fresh leaves of the shards."""
    leaves = [x.clone().requires_grad_() for x in shards]
    outs = fn(*leaves, local["masks"])
    loss = sum((out * w).sum() for out, w in zip(outs, local["weights"]))
    loss.backward()
    return [out.detach() for out in outs], [x.grad for x in leaves]


def _check_against_reference(outs, grads, full, masks, weights, layout):
    leaves = [x.clone().requires_grad_() for x in full]
    loss = 0
    for (spec, causal, mask), out, w in zip(CALLS, outs, weights):
        ref = dense_reference(*leaves, spec if spec is not None else DilatedSpec((N,), (1,)),
                              is_causal=causal, enable_gqa=True,
                              attn_mask=None if mask is None else masks[mask])
        torch.testing.assert_close(out, shard_sequence(ref, layout=layout), **TOL)
        loss = loss + (ref * w).sum()
    loss.backward()
    for name, grad, x in zip("qkv", grads, leaves):
        torch.testing.assert_close(grad, shard_sequence(x.grad, layout=layout), **TOL,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def _assert_same(compiled, eager, atol=0.0):
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# A shard's gradient sums the contributions of every call; compiled code may add them in
# another order (float64 rounding, ~1e-16).
GRAD_ATOL = 1e-13


def compiled(rank, world):
    """Both cases in one group (spawning the ranks costs as much as a compile)."""
    return {"entered outside": _entered_outside(), "entered inside": _entered_inside(),
            "dynamic, empty shard": _dynamic_with_an_empty_shard()}


def _entered_outside():
    """The context entered outside the compiled function, the pattern regions inside it: one
    graph (no break) whose six calls became the op; outputs and gradients equal eager mode and
    the reference. ``explain`` lists the rewrites; the stock Inductor backend, which does not
    rewrite, raises instead of computing the local dense attention."""
    layout = "zigzag"
    full, masks, weights, shards, local = _inputs(layout)
    counters.clear()
    compiled = torch.compile(_attend_all, backend="dilated_compile", fullgraph=True)
    with sequence_parallel(layout=layout):
        eager_outs, eager_grads = _run(_attend_all, shards, local)
        outs, grads = _run(compiled, shards, local)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["dilated_compile"]["sdpa_rewritten"] == len(CALLS)
        report = dilated_compile.explain(_attend_all, *shards, local["masks"])
    _assert_same(outs, eager_outs)
    _assert_same(grads, eager_grads, GRAD_ATOL)
    _check_against_reference(outs, grads, full, masks, weights, layout)

    assert len(report.graphs) == 1 and len(report.rewrites) == len(CALLS)
    assert {r.op for r in report.rewrites} == {"dilated_compile.sequence_parallel_attention"}
    after = [n.target for n in report.after.graph.nodes if n.op == "call_function"]
    assert after.count(sequence_parallel_attention_op) == len(CALLS) and annotation_op not in after
    assert "strategy='auto'" in str(report) and "layout='zigzag'" in str(report)

    torch._dynamo.reset()
    stock = torch.compile(_attend_all, backend="inductor")
    with sequence_parallel(layout=layout):
        try:
            stock(*shards, local["masks"])
        except RuntimeError as error:
            message = str(error)
        else:
            raise AssertionError("an unrewritten sequence_parallel annotation ran")
    assert "inside sequence_parallel(" in message and "backend='dilated_compile'" in message, message
    return "ok"


def _inside(q, k, v, masks):
    """The context entered inside the compiled function, both nesting orders and plain SDPA."""
    outs = []
    with sequence_parallel(layout="contiguous", strategy="all_gather"), dilated(DILATED):
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    with dilated(DILATED), sequence_parallel(layout="contiguous", strategy="all_gather"):
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=masks["float"], enable_gqa=True))
    with sequence_parallel(layout="contiguous"):
        outs.append(F.scaled_dot_product_attention(q * 2, k, v, enable_gqa=True).relu() / 2)
    return outs


def _entered_inside():
    """The context entered inside the compiled function: one graph, equal to eager mode. Then a
    function compiled under one context and called under another (layout, strategy): its guards
    send it to a recompile, never to the graph of the other context."""
    layout = "contiguous"
    full, masks, _, shards, local = _inputs(layout)
    counters.clear()
    compiled = torch.compile(_inside, backend="dilated_compile", fullgraph=True)
    local = {**local, "weights": local["weights"][:3]}
    eager_outs, eager_grads = _run(_inside, shards, local)
    outs, grads = _run(compiled, shards, local)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["dilated_compile"]["sdpa_rewritten"] == 3
    _assert_same(outs, eager_outs)
    _assert_same(grads, eager_grads, GRAD_ATOL)
    expected = dense_reference(*full, DILATED, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(outs[0], shard_sequence(expected, layout=layout), **TOL)

    def plain(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    # The guards are Dynamo's, whatever the backend: the faster twin serves.
    plain_compiled = torch.compile(plain, backend="dilated_compile_aot_eager", fullgraph=True)
    zigzag = [shard_sequence(x, layout="zigzag") for x in full]
    for context_layout, strategy, inputs in [("contiguous", "ring", shards), ("zigzag", "all_gather", zigzag),
                                             ("contiguous", "all_gather", shards)]:
        with sequence_parallel(layout=context_layout, strategy=strategy):
            got = plain_compiled(*inputs)
        expected = dense_reference(*full, DilatedSpec((N,), (1,)), is_causal=True, enable_gqa=True)
        torch.testing.assert_close(got, shard_sequence(expected, layout=context_layout), **TOL)
    # Calls that differ across ranks: the op raises the same error on every rank (no hang).
    rank = torch.distributed.get_rank()
    with sequence_parallel(layout="contiguous", strategy="ring" if rank == 0 else "all_gather"):
        try:
            plain_compiled(*shards)
        except ValueError as error:
            assert "the ranks disagree on strategy: rank 0: ring, rank 1: all_gather" in str(error), error
        else:
            raise AssertionError("calls that differ across ranks did not raise")
    return "ok"


def _dynamic_with_an_empty_shard():
    """Dynamic shapes over several lengths, one of them leaving rank 1 without positions (N = 1,
    contiguous): outputs and gradients equal the reference."""
    def attend(q, k, v):
        with dilated(DILATED):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    compiled = torch.compile(attend, backend="dilated_compile_aot_eager", dynamic=True, fullgraph=True)
    for n in (1, 6, 9):
        gen = torch.Generator().manual_seed(n)
        full = [torch.randn(B, h, n, D, generator=gen, dtype=torch.float64) for h in (HQ, HKV, HKV)]
        shards = [shard_sequence(x).requires_grad_() for x in full]
        with sequence_parallel(strategy="all_gather"):
            out = compiled(*shards)
        out.sum().backward()
        leaves = [x.clone().requires_grad_() for x in full]
        ref = dense_reference(*leaves, DILATED, is_causal=True, enable_gqa=True)
        ref.sum().backward()
        torch.testing.assert_close(out, shard_sequence(ref), **TOL)
        for shard, leaf in zip(shards, leaves):
            torch.testing.assert_close(shard.grad, shard_sequence(leaf.grad), **TOL)
    return "ok"
