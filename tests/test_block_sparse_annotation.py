"""``block_sparse(...)``: eager == compiled, layouts as graph inputs, nesting with ``dilated``,
``explain``, ``apply`` and ``export``, all against the float64 dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import BlockSparseSpec, DilatedSpec, block_sparse, dilated
from dilated_compile.ops import annotation_op, block_sparse_attention_op
from dilated_compile.testing import dense_reference

F64 = torch.float64
BIGBIRD = BlockSparseSpec(8, local_blocks=1, global_blocks=1, random_blocks=2, seed=3)


def _qkv(n=50, hq=4, hkv=2, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, n, 8, generator=g, dtype=dtype),
            torch.randn(2, hkv, n, 8, generator=g, dtype=dtype),
            torch.randn(2, hkv, n, 8, generator=g, dtype=dtype))


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_eager_region_and_decorator_compute_block_sparse_attention():
    q, k, v = _qkv()
    want = dense_reference(q, k, v, BIGBIRD, is_causal=True, enable_gqa=True)
    with block_sparse(BIGBIRD):
        torch.testing.assert_close(_attend(q, k, v), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(block_sparse(BIGBIRD)(_attend)(q, k, v), want, atol=1e-12, rtol=0)
    with block_sparse(block_size=8, local_blocks=1, global_blocks=1, random_blocks=2, seed=3):
        torch.testing.assert_close(_attend(q, k, v), want, atol=1e-12, rtol=0)
    # Outside the region SDPA is untouched.
    torch.testing.assert_close(_attend(q, k, v), F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))


def test_region_arguments_are_checked():
    with pytest.raises(TypeError, match="not both"):
        block_sparse(BIGBIRD, block_size=8)
    with pytest.raises(TypeError, match="spec must be a BlockSparseSpec"):
        block_sparse(DilatedSpec((8,), (1,)))
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=r"dropout_p=0.5 is not supported inside block_sparse\("):
        with block_sparse(BIGBIRD):
            F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    with pytest.raises(ValueError, match="layout has 3 heads but the query has 4"):
        three_heads = torch.ones(3, 7, 7, dtype=torch.bool)
        with block_sparse(BlockSparseSpec(8, local_blocks=None, layout=three_heads)):
            _attend(q, k, v)


@pytest.mark.parametrize("backend", ["dilated_compile", "dilated_compile_aot_eager"])
def test_compiled_equals_eager_for_every_length_in_one_graph(backend):
    counters.clear()
    compiled = torch.compile(block_sparse(BIGBIRD)(_attend), backend=backend, dynamic=True)
    for n in (50, 77, 130):
        q, k, v = _qkv(n, seed=n)
        want = dense_reference(q, k, v, BIGBIRD, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(compiled(q, k, v), want, atol=1e-12, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["dilated_compile"]["sdpa_rewritten"] >= 1


def test_a_layout_is_a_graph_input_so_one_graph_serves_every_layout_of_its_shape():
    counters.clear()
    compiled = torch.compile(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        backend="dilated_compile", fullgraph=True,
    )
    q, k, v = _qkv()
    for seed in range(3):
        layout = torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(seed)) < 0.4
        spec = BlockSparseSpec(8, local_blocks=None, layout=layout)
        with block_sparse(spec):
            out = compiled(q, k, v)
        torch.testing.assert_close(out, dense_reference(q, k, v, spec, enable_gqa=True), atol=1e-12, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1


def test_regions_of_both_families_nest_and_the_innermost_wins():
    q, k, v = _qkv()
    dilated_spec = DilatedSpec((16, 32), (1, 2))
    both = dilated(dilated_spec)(block_sparse(BIGBIRD)(_attend))
    inverse = block_sparse(BIGBIRD)(dilated(dilated_spec)(_attend))
    for fn, spec in ((both, BIGBIRD), (inverse, dilated_spec)):
        want = dense_reference(q, k, v, spec, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(fn(q, k, v), want, atol=1e-12, rtol=0)
        torch.testing.assert_close(torch.compile(fn, backend="dilated_compile")(q, k, v), want,
                                   atol=1e-12, rtol=0)


def test_explain_lists_the_block_sparse_rewrite():
    q, k, v = _qkv()
    report = dilated_compile.explain(block_sparse(BIGBIRD)(_attend), q, k, v)
    assert [r.op for r in report.rewrites] == ["dilated_compile.block_sparse_attention"]
    assert report.rewrites[0].spec == BIGBIRD
    assert "block_sparse_attention" in str(report)
    targets = {n.target for n in report.after.graph.nodes if n.op == "call_function"}
    assert block_sparse_attention_op in targets and annotation_op not in targets


def test_apply_takes_a_block_sparse_spec_and_a_mapping_of_both_families():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return _attend(q, k, v)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = Layer(), Layer()

        def forward(self, q, k, v):
            return self.second(self.first(q, k, v), k, v)

    model = Model()
    q, k, v = _qkv()
    dilated_spec = DilatedSpec((16,), (1,))
    handle = dilated_compile.apply(model, {"first": BIGBIRD, "second": dilated_spec})
    first = dense_reference(q, k, v, BIGBIRD, is_causal=True, enable_gqa=True)
    want = dense_reference(first, k, v, dilated_spec, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(model(q, k, v), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.compile(model, backend="dilated_compile")(q, k, v), want,
                               atol=1e-12, rtol=0)
    handle.remove()
    torch.testing.assert_close(model(q, k, v), _attend(_attend(q, k, v), k, v))


def test_export_holds_the_op_and_the_layout_as_an_input():
    layout = torch.rand(1, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    spec = BlockSparseSpec(8, local_blocks=0, layout=layout)

    class Model(torch.nn.Module):
        def forward(self, q, k, v):
            with block_sparse(spec):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    q, k, v = _qkv()
    program = dilated_compile.export(Model(), (q, k, v))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert block_sparse_attention_op in targets
    torch.testing.assert_close(program.module()(q, k, v), dense_reference(q, k, v, spec, enable_gqa=True),
                               atol=1e-12, rtol=0)
