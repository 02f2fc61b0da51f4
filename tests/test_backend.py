"""The compile backend: eager == compiled, dynamic shapes, graph breaks, other backends."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import DilatedSpec, GraphBreakInDilatedRegionWarning, dilated, dilated_attention

SPEC = DilatedSpec((8, 16, 32), (1, 2, 4))
GROUPS = DilatedSpec((6, 12), (1, 3), mode="head_groups")


def _inputs(b=2, hq=4, hkv=2, n=45, d=8, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(b, h, n, d, generator=g).requires_grad_(requires_grad)
    return make(hq), make(hkv), make(hkv)


def block(q, k, v, spec, is_causal):
    """A small attention block: projections around an annotated SDPA call."""
    with dilated(spec):
        out = F.scaled_dot_product_attention(q * 1.5, k, v.tanh(), is_causal=is_causal, enable_gqa=True)
    return out.sin() + q


def _check_eager_equals_compiled(spec, is_causal, backend, inputs):
    eager_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    out = compiled(*inputs, spec, is_causal)
    expected = block(*eager_inputs, spec, is_causal)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, eager_inputs, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert counters["dilated_compile"]["sdpa_rewritten"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("spec, is_causal", [(SPEC, True), (GROUPS, False)])
def test_inductor_eager_equals_compiled_forward_and_backward(spec, is_causal):
    _check_eager_equals_compiled(spec, is_causal, "dilated_compile", _inputs())


@settings(max_examples=12)
@given(
    configs=st.lists(
        st.integers(1, 24).flatmap(lambda w: st.tuples(st.just(w), st.integers(1, w))),
        min_size=1, max_size=3,
    ),
    mode=st.sampled_from(["mixture", "head_groups"]),
    n=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 2, 4]),
    is_causal=st.booleans(),
)
def test_eager_equals_compiled_property(configs, mode, n, kv_heads, is_causal):
    torch._dynamo.reset()
    counters.clear()
    spec = DilatedSpec([w for w, _ in configs], [r for _, r in configs], mode)
    inputs = _inputs(hq=4, hkv=kv_heads, n=n, seed=n)
    _check_eager_equals_compiled(spec, is_causal, "dilated_compile_aot_eager", inputs)


@pytest.mark.slow
def test_dynamic_sequence_length_compiles_once():
    @dilated(SPEC)
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = dilated_compile.compile(attend, dynamic=True, fullgraph=True)
    for n in (19, 45, 64, 7):
        q, k, v = _inputs(hq=2, hkv=2, n=n, requires_grad=False)
        torch.testing.assert_close(compiled(q, k, v), dilated_attention(q, k, v, SPEC, is_causal=True))
    assert counters["stats"]["unique_graphs"] == 1


def test_spec_change_recompiles_instead_of_reusing():
    """An enclosing region is part of what a compiled function is guarded on."""
    compiled = torch.compile(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        backend="dilated_compile_aot_eager",
    )
    q, k, v = _inputs(requires_grad=False)
    for spec in (SPEC, GROUPS, SPEC):
        with dilated(spec):
            out = compiled(q, k, v)
        torch.testing.assert_close(out, dilated_attention(q, k, v, spec, enable_gqa=True))
    dense = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(compiled(q, k, v), dense)


def two_calls(q, k, v):
    """Two annotated calls with a graph break between them."""
    with dilated(SPEC):
        x = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(x, k, v, enable_gqa=True)


def test_graph_break_inside_region_warns_and_stays_dilated():
    q, k, v = _inputs(requires_grad=False)
    with pytest.warns(GraphBreakInDilatedRegionWarning, match=r"test_backend.py:\d+ in two_calls") as record:
        out = torch.compile(two_calls, backend="dilated_compile_aot_eager")(q, k, v)
    assert "segment_lengths=(8, 16, 32)" in str(record[0].message)
    x = dilated_attention(q, k, v, SPEC, enable_gqa=True)
    torch.testing.assert_close(out, dilated_attention(x, k, v, SPEC, enable_gqa=True))
    assert counters["dilated_compile"]["graph_break_in_region"] == 1
    assert counters["dilated_compile"]["sdpa_rewritten"] == 2


def test_sdpa_at_a_graph_break_runs_eagerly_still_dilated():
    @torch._dynamo.disable
    def not_traced(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def fn(q, k, v):
        with dilated(SPEC):
            return not_traced(q.cos(), k, v).exp()

    q, k, v = _inputs(requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphBreakInDilatedRegionWarning)
        out = torch.compile(fn, backend="dilated_compile_aot_eager")(q, k, v)
    torch.testing.assert_close(out, dilated_attention(q.cos(), k, v, SPEC, enable_gqa=True).exp())


def test_no_warning_without_break_or_outside_regions():
    def fn(q, k, v):
        with dilated(SPEC):
            x = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        torch._dynamo.graph_break()
        return x * 2

    q, k, v = _inputs(requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphBreakInDilatedRegionWarning)
        torch.compile(fn, backend="dilated_compile_aot_eager")(q, k, v)


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_other_backends_raise_instead_of_computing_dense(backend):
    q, k, v = _inputs(requires_grad=False)
    compiled = torch.compile(block, backend=backend)
    with pytest.raises(RuntimeError, match="backend='dilated_compile'"):
        compiled(q, k, v, SPEC, False)


@pytest.mark.slow
def test_default_inductor_backend_raises_instead_of_computing_dense():
    q, k, v = _inputs(requires_grad=False)
    with pytest.raises(RuntimeError, match="was not rewritten"):
        torch.compile(block)(q, k, v, SPEC, False)


def test_unsupported_arguments_raise_under_compile():
    def with_dropout(q, k, v):
        with dilated(SPEC):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True)

    q, k, v = _inputs(requires_grad=False)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        torch.compile(with_dropout, backend="dilated_compile_aot_eager")(q, k, v)


def test_compile_rejects_another_backend():
    with pytest.raises(TypeError, match="always uses backend='dilated_compile'"):
        dilated_compile.compile(block, backend="inductor")


@pytest.mark.slow
def test_compile_forwards_inductor_options_and_works_as_decorator():
    @dilated_compile.compile(options={"epilogue_fusion": False}, fullgraph=True)
    @dilated(GROUPS)
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    q, k, v = _inputs(requires_grad=False)
    torch.testing.assert_close(attend(q, k, v), dilated_attention(q, k, v, GROUPS, enable_gqa=True))


def test_graph_break_inside_region_can_be_made_an_error():
    q, k, v = _inputs(requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphBreakInDilatedRegionWarning)
        message = r"graph break inside dilated\(.*test_backend.py:\d+ in two_calls"
        with pytest.raises(Exception, match=message):
            torch.compile(two_calls, backend="dilated_compile_aot_eager")(q, k, v)


def test_compiled_backward_with_transposed_projections():
    """q/k/v as views of a projection ([B, N, H, D] transposed): the backward's gradients are
    contiguous on every path and the compiled graph expects exactly that."""
    lin = torch.nn.Linear(16, 16, dtype=torch.float64)

    def f(x):
        q = lin(x).view(2, 10, 4, 4).transpose(1, 2)
        with dilated(segment_lengths=(4, 8), dilation_rates=(1, 2)):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    x = torch.randn(2, 10, 16, dtype=torch.float64)
    compiled = torch.compile(f, backend="dilated_compile_aot_eager")
    compiled(x).sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    f(x).sum().backward()
    torch.testing.assert_close(got, lin.weight.grad)
