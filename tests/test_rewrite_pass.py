"""The rewrite pass on small graphs: fires, skips, is idempotent, works on export graphs."""

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dilated_compile import DilatedSpec, dilated, dilated_attention, explain
from dilated_compile.ops import annotation_op, dilated_attention_op
from dilated_compile.passes import Rewrite, rewrite_annotated_sdpa
from dilated_compile.passes.rewrite_annotated_sdpa import REWRITES_META_KEY

SPEC = DilatedSpec((8, 16), (1, 2))
OTHER = DilatedSpec((4,), (2,), mode="head_groups")


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _sdpa_count(gm):
    sdpa = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
    return sum(t in sdpa for t in _targets(gm))


def two_annotated_one_plain(q, k, v):
    with dilated(SPEC):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with dilated(OTHER):
        b = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    c = F.scaled_dot_product_attention(q, k, v)
    return a + b + c


def _inputs(n=21):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, n, 8, generator=g) for _ in range(3))


def test_fires_on_annotated_calls_only():
    q, k, v = _inputs()
    before = explain(two_annotated_one_plain, q, k, v).before
    assert _sdpa_count(before) == 3 and _targets(before).count(annotation_op) == 2
    counters.clear()

    gm = rewrite_annotated_sdpa(torch.fx.GraphModule(before, before.graph.__deepcopy__()))

    targets = _targets(gm)
    assert targets.count(dilated_attention_op) == 2
    assert annotation_op not in targets
    assert _sdpa_count(gm) == 1  # the unannotated call is untouched
    assert counters["dilated_compile"]["sdpa_rewritten"] == 2
    rewrites = gm.meta[REWRITES_META_KEY]
    assert [r.spec for r in rewrites] == [SPEC, OTHER]
    assert all(isinstance(r, Rewrite) and r.op == "dilated_compile.dilated_attention" for r in rewrites)
    ops = [n for n in gm.graph.nodes if n.target is dilated_attention_op]
    assert ops[0].args[3:] == ([8, 16], [1, 2], "mixture", True, None)
    assert ops[1].args[3:] == ([4], [2], "head_groups", False, 0.25)
    # Source locations survive, so errors and profiles still point at the user's line.
    assert "two_annotated_one_plain" in ops[0].meta["stack_trace"]
    assert rewrites[0].source.startswith("test_rewrite_pass.py:")
    assert rewrites[0].source.endswith("in two_annotated_one_plain")

    expected = (
        dilated_attention(q, k, v, SPEC, is_causal=True)
        + dilated_attention(q, k, v, OTHER, scale=0.25)
        + F.scaled_dot_product_attention(q, k, v)
    )
    torch.testing.assert_close(gm(q, k, v)[0], expected)


def test_idempotent_and_no_op_without_annotations():
    q, k, v = _inputs()
    gm = explain(two_annotated_one_plain, q, k, v).after
    code = gm.code
    counters.clear()
    rewrite_annotated_sdpa(gm)
    assert gm.code == code and counters["dilated_compile"]["sdpa_rewritten"] == 0

    plain = explain(lambda q: F.scaled_dot_product_attention(q, q, q), q).before
    code = plain.code
    rewrite_annotated_sdpa(plain)
    assert plain.code == code


# Strict export reports the dilated(...) mode made inside forward as a side effect; harmless here.
@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects")
@pytest.mark.parametrize("strict", [True, False])
def test_export_then_pass_round_trip(strict):
    """torch.export keeps the annotation (as an aten-level graph); the pass rewrites it there."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return two_annotated_one_plain(q, k, v)

    q, k, v = _inputs()
    program = torch.export.export(Attention(), (q, k, v), strict=strict)
    assert _targets(program.graph_module).count(annotation_op) == 2
    with pytest.raises(RuntimeError, match="not rewritten"):
        program.module()(q, k, v)

    rewrite_annotated_sdpa(program.graph_module)

    assert _targets(program.graph_module).count(dilated_attention_op) == 2
    torch.testing.assert_close(program.module()(q, k, v), two_annotated_one_plain(q, k, v))


def _hand_built(dropout_p=0.0, mark_sdpa=True):
    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    sdpa = graph.call_function(
        torch.ops.aten.scaled_dot_product_attention.default, (q, q, q, None, dropout_p)
    )
    marked = sdpa if mark_sdpa else graph.call_function(torch.ops.aten.relu.default, (q,))
    out = graph.call_function(annotation_op, (marked, SPEC.to_json()))
    graph.output(graph.call_function(operator.add, (out, sdpa)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_hand_built_aten_graph_keeps_other_users_of_sdpa():
    gm = rewrite_annotated_sdpa(_hand_built())
    assert _targets(gm).count(dilated_attention_op) == 1 and _sdpa_count(gm) == 1
    (q,) = _inputs()[:1]
    expected = dilated_attention(q, q, q, SPEC) + F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(gm(q), expected)


def test_refuses_what_it_cannot_honour():
    with pytest.raises(NotImplementedError, match="dropout_p=0.5"):
        rewrite_annotated_sdpa(_hand_built(dropout_p=0.5))
    with pytest.raises(ValueError, match="not a scaled_dot_product_attention call"):
        rewrite_annotated_sdpa(_hand_built(mark_sdpa=False))
