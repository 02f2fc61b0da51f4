"""The aten decompositions of the dilated ops: exact against the float64 dense reference and
within dtype tolerance of the op, gradients included; traceable with a symbolic sequence length
(one graph for every N, no guard on N); no N x N tensor; usable as a run_decompositions table."""

from __future__ import annotations

import itertools
import operator

import pytest
import torch

from dilated_compile.ops import dilated_attention_backward_op, dilated_attention_op
from dilated_compile.ops.decompositions import (
    dilated_attention_backward_decomposition,
    dilated_attention_decomposition,
    dilated_attention_decompositions,
)
from dilated_compile.spec import DilatedSpec
from dilated_compile.testing import dense_reference

F64 = torch.float64

# Lengths that are multiples of no segment below and shorter than several of them.
SEQ_LENS = [1, 5, 31, 77]
SPECS = [
    ((4,), (1,)),
    ((8, 16), (1, 2)),
    ((5, 12, 33), (1, 3, 4)),  # rates that do not divide the segments
    ((64,), (7,)),  # w > N: rows with no key
]
MODES = ["mixture", "head_groups"]
# (query heads, kv heads, D, Dv)
HEADS = [(4, 4, 8, 8), (6, 2, 8, 12), (3, 1, 16, 8)]


def _inputs(q_heads, kv_heads, seq_len, d, dv, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, q_heads, seq_len, d), (2, kv_heads, seq_len, d), (2, kv_heads, seq_len, dv))
    return [
        torch.randn(shape, generator=g, dtype=F64).to(dtype).requires_grad_(requires_grad)
        for shape in shapes
    ]


def _finite_lse_grad(lse, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    return torch.where(torch.isfinite(lse), grad, 0.0)


CASES = [
    (spec, mode, heads, n, causal, scale)
    for (spec, mode), heads, n, (causal, scale) in itertools.product(
        itertools.product(SPECS, MODES), HEADS, SEQ_LENS, [(False, None), (True, 0.3)]
    )
    if not (mode == "head_groups" and heads[0] < len(spec[0]))
]


@pytest.mark.parametrize("spec,mode,heads,seq_len,causal,scale", CASES[::3])
def test_forward_and_gradients_match_reference_in_float64(spec, mode, heads, seq_len, causal, scale):
    q_heads, kv_heads, d, dv = heads
    q, k, v = _inputs(q_heads, kv_heads, seq_len, d, dv, requires_grad=True)
    args = (list(spec[0]), list(spec[1]), mode, causal, scale)
    out, lse = dilated_attention_decomposition(q, k, v, *args)
    ref_out, ref_lse = dense_reference(
        q, k, v, DilatedSpec(*spec, mode), is_causal=causal, scale=scale, enable_gqa=True,
        return_lse=True,
    )
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # rows with no key: -inf
    torch.testing.assert_close(lse[torch.isfinite(lse)], ref_lse[torch.isfinite(ref_lse)])

    grad_out, grad_lse = torch.randn_like(out), _finite_lse_grad(lse)

    def loss(o, row_lse):  # through out and through the finite lse
        finite = torch.where(torch.isfinite(row_lse), row_lse, 0.0)
        return (o * grad_out).sum() + (finite * grad_lse).sum()

    through_decomposition = torch.autograd.grad(loss(out, lse), (q, k, v))
    expected = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    backward = dilated_attention_backward_decomposition(
        grad_out, q, k, v, out.detach(), lse.detach(), grad_lse, *args
    )
    for got_autograd, got_backward, want in zip(through_decomposition, backward, expected):
        torch.testing.assert_close(got_autograd, want, atol=1e-10, rtol=0)
        torch.testing.assert_close(got_backward, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 4.0), (torch.bfloat16, 2.0)])
def test_low_precision_error_is_within_a_small_factor_of_the_ops(dtype, factor):
    """Three-way check: both against the float64 golden on the same rounded inputs."""
    args = ([8, 16, 40], [1, 2, 4], "mixture", True, None)
    q, k, v = _inputs(8, 4, 100, 16, 16, dtype=dtype)
    golden = dense_reference(
        q, k, v, DilatedSpec(*args[:3]), is_causal=True, enable_gqa=True
    )
    op_error = (dilated_attention_op(q, k, v, *args)[0].double() - golden).abs().max()
    error = (dilated_attention_decomposition(q, k, v, *args)[0].double() - golden).abs().max()
    assert dilated_attention_decomposition(q, k, v, *args)[0].dtype == dtype
    assert error <= factor * op_error + 1e-6


def test_backward_decomposition_matches_the_backward_op():
    args = ([6, 16], [2, 3], "head_groups", True, 0.2)
    q, k, v = _inputs(5, 5, 37, 8, 8, dtype=torch.float32)
    out, lse = dilated_attention_op(q, k, v, *args)
    grad_out, grad_lse = torch.randn_like(out), _finite_lse_grad(lse)
    for grad in (None, grad_lse):
        want = dilated_attention_backward_op(grad_out, q, k, v, out, lse, grad, *args)
        got = dilated_attention_backward_decomposition(grad_out, q, k, v, out, lse, grad, *args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _Op(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args

    def forward(self, q, k, v):
        return dilated_attention_op(q, k, v, *self.args)


class _BackwardOp(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args

    def forward(self, grad_out, q, k, v, out, lse):
        return dilated_attention_backward_op(grad_out, q, k, v, out, lse, None, *self.args)


def _call_targets(program):
    return {n.target for n in program.graph.nodes if n.op == "call_function"}


def test_one_graph_serves_every_sequence_length():
    """Exported with a symbolic N and decomposed: no guard on N, right for N < w, N not a
    multiple of any segment, one segment or many."""
    args = ([8, 12], [1, 3], "mixture", True, None)
    seq = torch.export.Dim("seq", min=1, max=1024)
    shapes = {name: {2: seq} for name in ("q", "k", "v")}
    q, k, v = _inputs(4, 2, 29, 8, 8, dtype=torch.float32)
    program = torch.export.export(_Op(args), (q, k, v), dynamic_shapes=shapes, strict=False)
    program = program.run_decompositions(dilated_attention_decompositions())

    assert dilated_attention_op not in _call_targets(program)
    assert not [n for n in program.graph.nodes if "assert" in str(n.target)]
    decomposed = program.module()
    for n in (1, 2, 7, 8, 12, 13, 24, 25, 100):
        q, k, v = _inputs(4, 2, n, 8, 8, dtype=torch.float32, seed=n)
        out, lse = decomposed(q, k, v)
        want_out, want_lse = dilated_attention_op(q, k, v, *args)
        torch.testing.assert_close(out, want_out, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=1e-5)


def _symbolic_sizes_of_one(program) -> list[str]:
    """Tensors of the graph with a symbolic size whose example value is 0 or 1."""
    found = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        for size in value.shape:
            if isinstance(size, torch.SymInt) and size.node.hint in (0, 1):
                found.append(f"{node.format_node()}: {size} = {size.node.hint}")
    return found


@pytest.mark.parametrize("example_len", [5, 12, 29])
def test_no_symbolic_size_is_one_in_the_example(example_len):
    """Compilers read sizes from the example input, and a size of 1 there gets specialised on
    (torch 2.11's Inductor guards S == 1 when reshaping [S * w] to [S, w]; an AOTInductor package
    never checks that guard). Traced from an example no longer than a segment, the layout carries
    a spare segment, so the number of segments is never 1: forward and backward."""
    args = ([8, 12], [1, 3], "mixture", True, None)
    seq = torch.export.Dim("seq", min=1, max=1024)
    q, k, v = _inputs(4, 2, example_len, 8, 8, dtype=torch.float32)
    shapes = {name: {2: seq} for name in ("q", "k", "v")}
    program = torch.export.export(_Op(args), (q, k, v), dynamic_shapes=shapes, strict=False)
    program = program.run_decompositions(dilated_attention_decompositions())
    assert not _symbolic_sizes_of_one(program)

    out, lse = dilated_attention_op(q, k, v, *args)
    grad_out = torch.randn_like(out)
    program = torch.export.export(
        _BackwardOp(args), (grad_out, q, k, v, out, lse),
        dynamic_shapes=tuple({2: seq} for _ in range(6)), strict=False,
    )
    program = program.run_decompositions(dilated_attention_decompositions())
    assert not _symbolic_sizes_of_one(program)
    for n in (1, 8, 13, 40):
        inputs = _inputs(4, 2, n, 8, 8, dtype=torch.float32, seed=n)
        out, lse = dilated_attention_op(*inputs, *args)
        grad_out = torch.randn_like(out)
        want = dilated_attention_backward_op(grad_out, *inputs, out, lse, None, *args)
        for a, b in zip(program.module()(grad_out, *inputs, out, lse), want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_op_decomposes_with_the_table():
    args = ([8, 16], [1, 2], "mixture", False, None)
    q, k, v = _inputs(4, 4, 40, 8, 8, dtype=torch.float32)
    out, lse = dilated_attention_op(q, k, v, *args)
    grad_out = torch.randn_like(out)
    program = torch.export.export(_BackwardOp(args), (grad_out, q, k, v, out, lse), strict=False)
    assert dilated_attention_backward_op in _call_targets(program)
    program = program.run_decompositions(dilated_attention_decompositions())
    assert dilated_attention_backward_op not in _call_targets(program)
    want = dilated_attention_backward_op(grad_out, q, k, v, out, lse, None, *args)
    for a, b in zip(program.module()(grad_out, q, k, v, out, lse), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_no_tensor_grows_with_n_squared(mode):
    """Every intermediate of the decomposed graph is O(N * w / r) per head (the scores of the
    first config are the largest: N * w / r^2 per head); none is N x N."""
    seq_len, w = 2048, (32, 64)
    args = (list(w), [1, 2], mode, True, None)
    q, k, v = _inputs(2, 2, seq_len, 16, 16, dtype=torch.float32)
    program = torch.export.export(_Op(args), (q, k, v), strict=False)
    program = program.run_decompositions(dilated_attention_decompositions())
    sizes = [
        value.numel()
        for node in program.graph.nodes
        for value in (node.meta.get("val"),)
        if isinstance(value, torch.Tensor)
    ]
    batch_heads = 2 * 2
    assert max(sizes) <= batch_heads * seq_len * max(w)  # O(N * w) per head
    assert max(sizes) < batch_heads * seq_len * seq_len // 16


def test_table_keys_are_the_public_ops():
    table = dilated_attention_decompositions()
    assert set(table) == {dilated_attention_op, dilated_attention_backward_op}
    assert all(callable(fn) for fn in table.values())


def test_rejects_what_the_op_rejects():
    q, k, v = _inputs(3, 2, 10, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        dilated_attention_decomposition(q, k, v, [4], [1], "mixture", False, None)
    q, k, v = _inputs(1, 1, 10, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="head_groups"):
        dilated_attention_decomposition(q, k, v, [4, 8], [1, 2], "head_groups", False, None)


def test_sum_helper_adds_without_a_zero_start():
    # Python's sum() would put an add(x, 0) into traced graphs.
    from dilated_compile.ops.decompositions import _sum

    x = torch.ones(2)
    assert torch.equal(_sum([x, x, x]), 3 * x)
    graph = torch.fx.symbolic_trace(lambda a, b: _sum([a, b])).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [operator.add]
