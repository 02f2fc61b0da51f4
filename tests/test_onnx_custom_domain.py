"""``to_onnx(..., custom_domain=True)``: one ``dilated_compile.DilatedAttention`` node per call,
with the pattern and the resolved scale as attributes (and the mask, when the call has one, as
its fourth input); a runtime that brings its own kernel (here ONNX's reference evaluator with a
kernel that calls the op) reproduces eager. A masked call also exports to standard ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx", reason="the onnx extra is part of the test extra")
from onnx.reference import ReferenceEvaluator  # noqa: E402
from onnx.reference.op_run import OpRun  # noqa: E402

import dilated_compile  # noqa: E402
from dilated_compile import DilatedSpec, dilated  # noqa: E402
from dilated_compile.onnx_export import CUSTOM_DOMAIN, CUSTOM_OP_TYPE  # noqa: E402
from dilated_compile.ops import dilated_attention_op  # noqa: E402

MIXTURE = DilatedSpec((8, 16), (1, 2))
GROUPS = DilatedSpec((4, 12), (2, 3), mode="head_groups")


class TwoCalls(torch.nn.Module):
    """Two annotated calls: GQA causal mixture with the default scale, head_groups with 0.3."""

    def forward(self, q, k, v):
        with dilated(MIXTURE):
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with dilated(GROUPS):
            b = F.scaled_dot_product_attention(q, q, q, scale=0.3)
        return a + b


class DilatedAttentionKernel(OpRun):
    """A runtime's own kernel for the custom node (the library's op, through numpy)."""

    op_domain = CUSTOM_DOMAIN

    def _run(self, query, key, value, attn_mask=None, segment_lengths=None, dilation_rates=None,
             mode=None, is_causal=None, scale=None):
        mode = mode.decode() if isinstance(mode, bytes) else mode
        mask = None if attn_mask is None else torch.from_numpy(np.ascontiguousarray(attn_mask))
        out, lse = dilated_attention_op(
            *(torch.from_numpy(np.ascontiguousarray(x)) for x in (query, key, value)),
            list(segment_lengths), list(dilation_rates), mode, bool(is_causal), float(scale), mask,
        )
        return out.numpy(), lse.numpy()


DilatedAttentionKernel.__name__ = CUSTOM_OP_TYPE


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g),
            torch.randn(1, 2, n, 8, generator=g))


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory):
    seq = torch.export.Dim("seq", min=2, max=256)
    path = tmp_path_factory.mktemp("onnx") / "custom.onnx"
    dilated_compile.to_onnx(
        TwoCalls(), _inputs(21), path, custom_domain=True,
        dynamic_shapes=({2: seq}, {2: seq}, {2: seq}), external_data=False,
    )
    return onnx.load(path)


def test_one_node_per_call_with_the_pattern_as_attributes(custom_model):
    assert (CUSTOM_DOMAIN, 1) in {(o.domain, o.version) for o in custom_model.opset_import}
    nodes = [n for n in custom_model.graph.node if n.domain == CUSTOM_DOMAIN]
    assert [n.op_type for n in nodes] == [CUSTOM_OP_TYPE, CUSTOM_OP_TYPE]
    attributes = [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes
    ]
    assert attributes[0]["segment_lengths"] == [8, 16]
    assert attributes[0]["dilation_rates"] == [1, 2]
    assert attributes[0]["mode"] == b"mixture" and attributes[0]["is_causal"] == 1
    assert attributes[0]["scale"] == pytest.approx(1 / math.sqrt(8))  # resolved at export
    assert attributes[1]["mode"] == b"head_groups" and attributes[1]["is_causal"] == 0
    assert attributes[1]["scale"] == pytest.approx(0.3)
    assert [len(n.output) for n in nodes] == [2, 2]  # output and lse
    assert "MatMul" not in {n.op_type for n in custom_model.graph.node}  # nothing decomposed
    onnx.checker.check_model(custom_model)


@pytest.mark.parametrize("n", [5, 21, 40])
def test_a_runtime_with_its_own_kernel_reproduces_eager(custom_model, n):
    session = ReferenceEvaluator(custom_model, new_ops=[DilatedAttentionKernel])
    q, k, v = _inputs(n, seed=n)
    names = [i.name for i in custom_model.graph.input]
    (got,) = session.run(None, dict(zip(names, (q.numpy(), k.numpy(), v.numpy()))))
    torch.testing.assert_close(torch.from_numpy(got), TwoCalls()(q, k, v), atol=1e-5, rtol=1e-5)


class KeyPadded(torch.nn.Module):
    """The op called with a bool key-padding mask [B, 1, 1, N]."""

    def forward(self, q, k, v, mask):
        return torch.ops.dilated_compile.dilated_attention(
            q, k, v, [8, 16], [1, 2], "mixture", False, 0.3, mask
        )[0]


def _padded(n, seed=0):
    q, k, v = _inputs(n, seed)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    mask[..., n - n // 3 :] = False
    return q, k, v, mask


@pytest.fixture(scope="module")
def padded_models(tmp_path_factory):
    seq = torch.export.Dim("seq", min=2, max=256)
    shapes = ({2: seq}, {2: seq}, {2: seq}, {3: seq})
    program = dilated_compile.export(KeyPadded(), _padded(21), dynamic_shapes=shapes)
    directory = tmp_path_factory.mktemp("onnx_masked")
    paths = {}
    for name, custom in (("custom", True), ("standard", False)):
        paths[name] = directory / f"{name}.onnx"
        dilated_compile.to_onnx(program, _padded(21), paths[name], custom_domain=custom,
                                external_data=False)
    return {name: onnx.load(path) for name, path in paths.items()}


def test_the_mask_is_the_custom_nodes_fourth_input(padded_models):
    model = padded_models["custom"]
    (node,) = [n for n in model.graph.node if n.domain == CUSTOM_DOMAIN]
    assert len(node.input) == 4 and node.input[3] == model.graph.input[3].name
    onnx.checker.check_model(model)
    session = ReferenceEvaluator(model, new_ops=[DilatedAttentionKernel])
    names = [i.name for i in model.graph.input]
    for n in (5, 40):
        inputs = _padded(n, seed=n)
        (got,) = session.run(None, dict(zip(names, (x.numpy() for x in inputs))))
        torch.testing.assert_close(torch.from_numpy(got), KeyPadded()(*inputs), atol=1e-5, rtol=1e-5)


def test_a_masked_call_in_standard_ops_runs_in_onnxruntime(padded_models):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = padded_models["standard"]
    assert {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    for n in (2, 9, 40):
        inputs = _padded(n, seed=n)
        (got,) = session.run(None, dict(zip(names, (x.numpy() for x in inputs))))
        torch.testing.assert_close(torch.from_numpy(got), KeyPadded()(*inputs), atol=1e-5, rtol=1e-5)
