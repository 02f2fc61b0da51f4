"""The aten decompositions of the dilated ops: exact against the float64 dense reference and
within dtype tolerance of the op, gradients included; traceable with a symbolic sequence length
(one graph for every N, no guard on N); no N x N tensor; usable as a run_decompositions table."""

from __future__ import annotations

import itertools
import operator

import pytest
import torch

from dilated_compile.ops import block_sparse_attention_backward_op, block_sparse_attention_op

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


def _check_gradients(q, k, v, out, lse, ref_out, ref_lse, args):
    """dq, dk, dv through the decomposition (autograd) and from its backward decomposition,
    against the reference, for a loss through out and through the finite lse."""
    grad_out, grad_lse = torch.randn_like(out), _finite_lse_grad(lse)

    def loss(o, row_lse):
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

    _check_gradients(q, k, v, out, lse, ref_out, ref_lse, args)


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
    assert set(table) == {
        dilated_attention_op, dilated_attention_backward_op,
        block_sparse_attention_op, block_sparse_attention_backward_op,
    }
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


# --------------------------------------------------------------------------------------------
# attn_mask and fewer queries than keys
# --------------------------------------------------------------------------------------------


def _mask(shape, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < 0.7
    if kind == "bool":
        return keep
    return torch.randn(shape, generator=g, dtype=F64).masked_fill(~keep, float("-inf"))


# (spec, mode, (Hq, Hkv, D, Dv), Nq, Nk, mask shape or None, mask kind, causal). Nq no larger
# than a segment's rows takes the per-query layout, larger Nq < Nk the window of segments.
MASKED_CASES = [
    (((4,), (1,)), "mixture", (4, 4, 8, 8), 7, 7, (2, 1, 1, 7), "bool", False),
    (((8, 16), (1, 2)), "mixture", (6, 2, 8, 12), 31, 31, (31, 31), "float", False),
    (((5, 12, 33), (1, 3, 4)), "head_groups", (3, 1, 16, 8), 1, 40, (2, 1, 1, 40), "bool", False),
    (((5, 12, 33), (1, 3, 4)), "mixture", (4, 2, 8, 8), 3, 40, (2, 4, 3, 40), "float", False),
    (((8, 16), (1, 2)), "head_groups", (4, 4, 8, 8), 13, 29, (13, 29), "bool", False),
    (((8, 16), (1, 2)), "mixture", (6, 2, 8, 12), 20, 77, (2, 1, 20, 77), "float", False),
    (((64,), (7,)), "mixture", (4, 4, 8, 8), 9, 31, (31,), "bool", False),
    (((5, 12, 33), (1, 3, 4)), "mixture", (4, 2, 8, 8), 1, 37, None, None, True),
    (((8, 16), (1, 2)), "mixture", (6, 2, 8, 12), 12, 45, None, None, True),
    (((4,), (1,)), "head_groups", (4, 4, 8, 8), 2, 9, (1, 1, 2, 9), "float", False),
    # rows 5, 4, 9: two configs by window, one per query
    (((5, 12, 33), (1, 3, 4)), "mixture", (4, 2, 8, 8), 6, 40, (6, 40), "bool", False),
]


@pytest.mark.parametrize("spec,mode,heads,q_len,kv_len,mask_shape,kind,causal", MASKED_CASES)
def test_masks_and_fewer_queries_match_reference_in_float64(
    spec, mode, heads, q_len, kv_len, mask_shape, kind, causal
):
    q_heads, kv_heads, d, dv = heads
    g = torch.Generator().manual_seed(q_len * 100 + kv_len)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    q, k, v = make(2, q_heads, q_len, d), make(2, kv_heads, kv_len, d), make(2, kv_heads, kv_len, dv)
    mask = None if mask_shape is None else _mask(mask_shape, kind, seed=q_len)
    args = (list(spec[0]), list(spec[1]), mode, causal, None, mask)
    out, lse = dilated_attention_decomposition(q, k, v, *args)
    ref_out, ref_lse = dense_reference(
        q, k, v, DilatedSpec(*spec, mode), is_causal=causal, enable_gqa=True, return_lse=True,
        attn_mask=mask,
    )
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)  # -inf rows included

    _check_gradients(q, k, v, out, lse, ref_out, ref_lse, args)


class _MaskedOp(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args

    def forward(self, q, k, v, mask):
        return dilated_attention_op(q, k, v, *self.args, mask)


class _MaskedBackwardOp(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args

    def forward(self, grad_out, q, k, v, out, lse, mask):
        return dilated_attention_backward_op(grad_out, q, k, v, out, lse, None, *self.args, mask)


def _masked_inputs(q_len, kv_len, seed=0):
    q, k, v = _inputs(4, 2, q_len, 8, 8, dtype=torch.float32, seed=seed)
    k, v = _inputs(2, 2, kv_len, 8, 8, dtype=torch.float32, seed=seed + 1)[1:]
    return q, k, v, _mask((2, 1, 1, kv_len), "bool", seed=seed)  # key padding


def test_one_graph_serves_every_length_with_a_mask_and_fewer_queries():
    """Nq and Nk each symbolic, a key-padding mask: decomposed with no guard, right for Nq == Nk,
    Nq < Nk, one segment or many; forward and backward."""
    args = ([8, 12], [1, 3], "mixture", False, None)
    queries = torch.export.Dim("queries", min=2, max=512)
    keys = torch.export.Dim("keys", min=2, max=1024)
    example = _masked_inputs(5, 29)
    shapes = ({2: queries}, {2: keys}, {2: keys}, {3: keys})
    program = torch.export.export(_MaskedOp(args), example, dynamic_shapes=shapes, strict=False)
    program = program.run_decompositions(dilated_attention_decompositions())
    assert dilated_attention_op not in _call_targets(program)
    assert not [n for n in program.graph.nodes if "assert" in str(n.target)]
    assert not _symbolic_sizes_of_one(program)
    lengths = [(2, 2), (2, 40), (7, 8), (13, 13), (3, 100), (30, 31), (100, 300)]
    for q_len, kv_len in lengths:
        inputs = _masked_inputs(q_len, kv_len, seed=q_len + kv_len)
        for got, want in zip(program.module()(*inputs), dilated_attention_op(*inputs[:3], *args, inputs[3])):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)

    out, lse = dilated_attention_op(*example[:3], *args, example[3])
    program = torch.export.export(
        _MaskedBackwardOp(args), (torch.randn_like(out), *example[:3], out, lse, example[3]),
        dynamic_shapes=({2: queries}, *shapes[:3], {2: queries}, {2: queries}, shapes[3]),
        strict=False,
    )
    program = program.run_decompositions(dilated_attention_decompositions())
    assert not [n for n in program.graph.nodes if "assert" in str(n.target)]
    for q_len, kv_len in lengths[:5]:
        q, k, v, mask = _masked_inputs(q_len, kv_len, seed=q_len + kv_len)
        out, lse = dilated_attention_op(q, k, v, *args, mask)
        grad_out = torch.randn_like(out)
        want = dilated_attention_backward_op(grad_out, q, k, v, out, lse, None, *args, mask)
        for got, expected in zip(program.module()(grad_out, q, k, v, out, lse, mask), want):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("example_len", [5, 29])
def test_a_mask_on_one_symbolic_length(example_len):
    """Queries, keys and mask of one symbolic length (self-attention with key padding): the
    whole-sequence layout, its spare segment included; no size is 1 in the example."""
    args = ([8, 12], [1, 3], "mixture", False, None)
    seq = torch.export.Dim("seq", min=2, max=1024)
    example = _masked_inputs(example_len, example_len)
    shapes = ({2: seq}, {2: seq}, {2: seq}, {3: seq})
    program = torch.export.export(_MaskedOp(args), example, dynamic_shapes=shapes, strict=False)
    program = program.run_decompositions(dilated_attention_decompositions())
    assert not [n for n in program.graph.nodes if "assert" in str(n.target)]
    assert not _symbolic_sizes_of_one(program)
    for n in (2, 8, 13, 40):
        inputs = _masked_inputs(n, n, seed=n)
        for got, want in zip(program.module()(*inputs), dilated_attention_op(*inputs[:3], *args, inputs[3])):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_a_decoding_graph_serves_every_cache_length():
    """One query (a static size), a symbolic cache: the per-query layout, causal."""
    args = ([8, 12], [1, 3], "mixture", True, None)
    keys = torch.export.Dim("keys", min=2, max=1024)
    q, k, v, _ = _masked_inputs(1, 29)
    program = torch.export.export(
        _Op(args), (q, k, v), dynamic_shapes=({}, {2: keys}, {2: keys}), strict=False
    )
    program = program.run_decompositions(dilated_attention_decompositions())
    assert not [n for n in program.graph.nodes if "assert" in str(n.target)]
    for kv_len in (2, 8, 12, 13, 25, 200):
        q, k, v, _ = _masked_inputs(1, kv_len, seed=kv_len)
        for got, want in zip(program.module()(q, k, v), dilated_attention_op(q, k, v, *args)):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def _largest_intermediate(program) -> int:
    return max(
        value.numel()
        for node in program.graph.nodes
        if node.op != "placeholder"
        for value in (node.meta.get("val"),)
        if isinstance(value, torch.Tensor)
    )


def test_a_key_padding_mask_and_a_decoding_step_stay_small():
    """The [B, 1, 1, N] mask adds nothing of size N x N (its gathered entries are [B, 1, group,
    S, 1, rows]); a decoding step's intermediates are one segment's rows, not the cache."""
    seq_len, w = 2048, (32, 64)
    args = (list(w), [1, 2], "mixture", False, None)
    q, k, v, mask = _masked_inputs(seq_len, seq_len)
    program = torch.export.export(_MaskedOp(args), (q, k, v, mask), strict=False)
    program = program.run_decompositions(dilated_attention_decompositions())
    batch_heads = 2 * 4
    assert _largest_intermediate(program) <= batch_heads * seq_len * max(w)

    q = q[:, :, -1:]
    program = torch.export.export(_MaskedOp(args), (q, k, v, mask), strict=False)
    program = program.run_decompositions(dilated_attention_decompositions())
    assert _largest_intermediate(program) <= batch_heads * max(w) * 8  # rows x D per head
