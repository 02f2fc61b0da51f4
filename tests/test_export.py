"""``dilated_compile.export``: the annotation survives strict and non-strict export, the rewrite
runs on the exported graph, run_decompositions keeps the op unless asked, save/load round trip,
the dilated(...) side-effect warning is silenced (and only it), clear errors; a call with a
key-padding mask exports with the mask as the op's input."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import DilatedSpec, dilated
from dilated_compile.ops import annotation_op, dilated_attention_op
from dilated_compile.ops.decompositions import dilated_attention_decompositions
from dilated_compile.passes.rewrite_annotated_sdpa import REWRITES_META_KEY
from dilated_compile.testing import dense_reference

SPEC = DilatedSpec((8, 16), (1, 2))


class Block(torch.nn.Module):
    """Projections, dilated causal GQA attention opened inside forward, and a plain SDPA."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        with dilated(SPEC):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        dense = F.scaled_dot_product_attention(q, q, q)  # not annotated: stays SDPA
        return (y + dense).transpose(1, 2).reshape(b, n, -1)


def _targets(program):
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def _x(n=37, seed=0):
    return torch.randn(2, n, 32, generator=torch.Generator().manual_seed(seed))


SEQ = torch.export.Dim("seq", max=4096)


@pytest.mark.parametrize("strict", [True, False])
def test_annotation_kept_and_rewritten_on_the_exported_graph(strict):
    model = Block().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = dilated_compile.export(
            model, (_x(),), dynamic_shapes={"x": {1: SEQ}}, strict=strict
        )
    assert not [w for w in caught if "side effects" in str(w.message)]
    targets = _targets(program)
    assert targets.count(dilated_attention_op) == 1 and annotation_op not in targets
    assert targets.count(torch.ops.aten.scaled_dot_product_attention.default) == 1
    (rewrite,) = program.graph_module.meta[REWRITES_META_KEY]
    assert rewrite.spec == SPEC
    assert rewrite.source.startswith("test_export.py:") and rewrite.source.endswith("in forward")
    (node,) = [n for n in program.graph.nodes if n.target is dilated_attention_op]
    assert node.args[3:] == ([8, 16], [1, 2], "mixture", True, None)
    for n in (5, 16, 37, 50):  # one program, any sequence length
        torch.testing.assert_close(program.module()(_x(n, seed=n)), model(_x(n, seed=n)))


@pytest.mark.parametrize("strict", [True, False])
def test_a_rewrite_names_the_model_line_for_the_library_modules(strict):
    """The source of a rewrite is a line of model code, here the library's own module, never
    PyTorch's export wrappers (which strict export puts innermost outside the library)."""
    from dilated_compile.nn import MultiheadDilatedAttention

    model = MultiheadDilatedAttention(32, 4, segment_lengths=(8, 16), dilation_rates=(1, 2),
                                      batch_first=True).eval()
    x = _x()
    program = dilated_compile.export(model, (x, x, x), strict=strict)
    (rewrite,) = program.graph_module.meta[REWRITES_META_KEY]
    assert rewrite.source.split(":")[0] in {"attention.py", "multihead.py"}, rewrite.source


def test_run_decompositions_keeps_the_op_unless_asked():
    model = Block().eval()
    program = dilated_compile.export(model, (_x(),), dynamic_shapes={"x": {1: SEQ}})
    core = program.run_decompositions()
    assert dilated_attention_op in _targets(core)

    plain = program.run_decompositions(dilated_attention_decompositions())
    assert dilated_attention_op not in _targets(plain)
    table = torch.export.default_decompositions()
    table.update(dilated_attention_decompositions())
    core_plain = program.run_decompositions(table)
    assert dilated_attention_op not in _targets(core_plain)
    for n in (3, 16, 41):
        x = _x(n, seed=n)
        for decomposed in (plain, core_plain):
            torch.testing.assert_close(decomposed.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip():
    model = Block().eval()
    program = dilated_compile.export(model, (_x(),), dynamic_shapes={"x": {1: SEQ}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert dilated_attention_op in _targets(loaded)
    x = _x(23, seed=3)
    torch.testing.assert_close(loaded.module()(x), model(x))


def test_only_the_region_side_effect_warning_is_silenced():
    """A real side effect of forward is still reported by strict export."""

    class Mutating(Block):
        def forward(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dilated_compile.export(Mutating().eval(), (_x(),))
    messages = [str(w.message) for w in caught if "side effects" in str(w.message)]
    assert len(messages) == 1 and "L['self']" in messages[0]


def test_a_program_exported_by_torch_export_needs_the_rewrite():
    model = Block().eval()
    raw = torch.export.export(model, (_x(),), strict=False)
    with pytest.raises(ValueError, match="rewrite_annotated_sdpa"):
        dilated_compile.tensorrt.lower(raw, (_x(),))


def test_errors_name_the_argument():
    model = Block()
    with pytest.raises(TypeError, match=r"args must be a tuple.*\(x,\)"):
        dilated_compile.export(model, _x())
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        dilated_compile.export(lambda x: x, (_x(),))
    program = dilated_compile.export(model, (_x(),))
    with pytest.raises(ValueError, match="dynamic_shapes"):
        dilated_compile.tensorrt.lower(program, (_x(),), dynamic_shapes={"x": {1: SEQ}})


def test_model_that_returns_the_attention_output():
    """The rewritten node is the graph's output: the program's signature follows it."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            with dilated(SPEC):
                return F.scaled_dot_product_attention(q, k, v)

    q = k = v = torch.randn(1, 2, 20, 8)
    program = dilated_compile.export(Attention(), (q, k, v))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    torch.testing.assert_close(
        torch.export.load(buffer).module()(q, k, v), Attention()(q, k, v)
    )


def test_importing_the_library_imports_no_exporter_dependency():
    import subprocess
    import sys

    code = (
        "import sys, dilated_compile\n"
        "heavy = [m for m in ('onnx', 'onnxscript', 'onnxruntime', 'torch_tensorrt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(dilated_compile.tensorrt.compile) and callable(dilated_compile.to_onnx)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


class KeyPadded(torch.nn.Module):
    """The op called directly with a bool key-padding mask [B, 1, 1, N] (True = a real token)."""

    def forward(self, q, k, v, mask):
        out, _ = torch.ops.dilated_compile.dilated_attention(
            q, k, v, [8, 16], [1, 2], "mixture", False, None, mask
        )
        return out


def _padded(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, 8, generator=g)
    k, v = torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., n - n // 3 :] = False  # the second sequence ends in padding
    return q, k, v, mask


@pytest.mark.parametrize("strict", [True, False])
def test_a_key_padding_mask_is_exported_as_the_ops_input(strict):
    seq = torch.export.Dim("seq", min=2, max=4096)
    program = dilated_compile.export(
        KeyPadded(), _padded(21), dynamic_shapes=({2: seq}, {2: seq}, {2: seq}, {3: seq}),
        strict=strict,
    )
    (node,) = [n for n in program.graph.nodes if n.target is dilated_attention_op]
    mask_arg = node.args[8] if len(node.args) > 8 else node.kwargs["attn_mask"]
    assert mask_arg.op == "placeholder" and mask_arg.meta["val"].dtype == torch.bool
    decomposed = program.run_decompositions(dilated_attention_decompositions())
    assert dilated_attention_op not in _targets(decomposed)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for n in (5, 16, 37, 50):
        inputs = _padded(n, seed=n)
        want = KeyPadded()(*inputs)
        reference = dense_reference(
            *inputs[:3], SPEC, enable_gqa=True, attn_mask=inputs[3]
        ).float()
        torch.testing.assert_close(want, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(program.module()(*inputs), want)
        torch.testing.assert_close(loaded.module()(*inputs), want)
        torch.testing.assert_close(decomposed.module()(*inputs), want, atol=1e-5, rtol=1e-5)
