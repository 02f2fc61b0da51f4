"""The deployment targets of one annotated language model exported with a dynamic sequence
length: an AOTInductor package (CPU here; CUDA under the gpu marker) and an ONNX model of standard
ops, both loaded in one fresh process that cannot import dilated_compile, run at several lengths
and compared with eager."""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import DilatedSpec, dilated
from dilated_compile.aot import _python_ops_in_package

WORKER = os.path.join(os.path.dirname(__file__), "export_worker.py")
SPEC = DilatedSpec((8, 16), (1, 2))
LENGTHS = [2, 5, 16, 37, 100]
SEQ = torch.export.Dim("seq", min=2, max=512)
# Standard ONNX ops the decomposed model is made of (checked, so a change is noticed).
STANDARD_ONNX_OPS = {
    "Add", "And", "Cast", "Concat", "Constant", "ConstantOfShape", "Div", "Equal", "Exp",
    "Expand", "Gather", "Gemm", "Greater", "GreaterOrEqual", "Less", "Log", "MatMul", "Mul",
    "Pad", "Range", "ReduceMax", "ReduceSum", "Reshape", "Shape", "Slice", "Softmax", "Squeeze",
    "Sub", "Transpose", "Unsqueeze", "Where", "LayerNormalization", "Gelu", "Tanh", "Erf", "Sqrt",
    "Pow", "ReduceMean", "Reciprocal", "Neg", "Identity", "Max", "Min", "Split",
}


class TinyLM(torch.nn.Module):
    """Embedding, two pre-norm blocks of causal dilated GQA attention (SDPA inside dilated(...))
    and an MLP, then the logits."""

    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, layers=1):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({
                "norm1": torch.nn.LayerNorm(dim),
                "qkv": torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim),
                "out": torch.nn.Linear(dim, dim),
                "norm2": torch.nn.LayerNorm(dim),
                "mlp": torch.nn.Sequential(
                    torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
                ),
            })
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, n, _ = x.shape
        for block in self.blocks:
            qkv = block["qkv"](block["norm1"](x)).view(b, n, -1, self.head_dim).transpose(1, 2)
            q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
            with dilated(SPEC):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + block["out"](y.transpose(1, 2).reshape(b, n, -1))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(x)


def _tokens(n, seed=0):
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyLM().eval()
    # An example no longer than a segment: every config has one segment there, and the
    # artefacts must still be right for many segments (a package checks no guard on them).
    example = (_tokens(7),)
    program = dilated_compile.export(model, example, dynamic_shapes={"tokens": {1: SEQ}})
    directory = tmp_path_factory.mktemp("artefacts")
    package = dilated_compile.aot_compile(program, example, directory / "lm.pt2")
    onnx_path = directory / "lm.onnx"
    dilated_compile.to_onnx(program, example, onnx_path, external_data=False)
    inputs = [_tokens(n, seed=n) for n in LENGTHS]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    cases = directory / "cases.pt"
    torch.save({"inputs": inputs, "expected": expected, "device": "cpu"}, cases)
    return {"package": package, "onnx": str(onnx_path), "cases": str(cases)}


def _run_worker(*args):
    done = subprocess.run(
        [sys.executable, WORKER, *args], capture_output=True, text=True, timeout=300
    )
    if done.returncode == -signal.SIGSEGV:  # the known cause is the C++ compiler (docs/export.md)
        pytest.fail("the worker crashed (SIGSEGV) loading the package: see 'Troubleshooting' in "
                    f"docs/export.md (build with CXX=g++-12)\n{done.stderr[-3000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_artefacts_run_without_the_library_at_every_length(artefacts):
    report = _run_worker(artefacts["cases"], "--aoti", artefacts["package"], "--onnx", artefacts["onnx"])
    assert report["lengths"] == LENGTHS
    assert not report["dilated_compile_imported"]
    assert max(report["aoti"]) < 1e-4, report
    assert max(report["onnx"]) < 1e-4, report


@pytest.mark.slow
def test_package_calls_no_python_op(artefacts):
    assert _python_ops_in_package(artefacts["package"]) == []


@pytest.mark.slow
def test_onnx_model_is_made_of_standard_ops(artefacts):
    import onnx

    model = onnx.load(artefacts["onnx"])
    onnx.checker.check_model(model)
    assert {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert set(ops) <= STANDARD_ONNX_OPS, set(ops) - STANDARD_ONNX_OPS
    assert ops["MatMul"] >= 4  # two per block and config at least: scores and values
    # The sequence length stays symbolic.
    (tokens,) = model.graph.input
    assert tokens.type.tensor_type.shape.dim[1].dim_param


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        with dilated(SPEC):
            return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.slow
def test_a_package_that_would_need_the_library_is_refused(tmp_path):
    """Kept on CPU, the op runs its Python implementation: the package is not kept."""
    q = k = v = torch.randn(1, 2, 20, 8)
    path = tmp_path / "attention.pt2"
    with pytest.raises(RuntimeError, match=r"dilated_compile::.*decompose=True"):
        dilated_compile.aot_compile(Attention(), (q, k, v), path, decompose=False)
    assert not path.exists()


def test_package_check_finds_runtime_calls_of_our_ops(tmp_path):
    """What AOTInductor writes for an op it calls through the dispatcher at run time."""
    path = tmp_path / "fake.pt2"
    node = {"nodes": [{"name": "buf1", "node": {"target": "dilated_compile::dilated_attention_pytorch"}}]}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fake/data/aotinductor/model/x.wrapper.json", json.dumps(node))
        archive.writestr("fake/data/aotinductor/model/x.wrapper.cpp", "// dilated_compile::x")
    assert _python_ops_in_package(str(path)) == ["dilated_compile::dilated_attention_pytorch"]


def test_a_package_specialised_by_inductor_is_refused(tmp_path, monkeypatch):
    """If compiling narrows a dynamic dimension's range (a guard from the example's sizes, which
    a package never checks), the package would be wrong elsewhere: it is deleted, with an error."""
    model = TinyLM().eval()
    program = dilated_compile.export(model, (_tokens(7),), dynamic_shapes={"tokens": {1: SEQ}})

    def narrowing_compile(program, package_path, inductor_configs=None):
        (symbol,) = program.range_constraints
        env = next(n for n in program.graph.nodes if n.op == "placeholder").meta["val"]
        env = env.fake_mode.shape_env
        env.var_to_range[symbol] = type(env.var_to_range[symbol])(2, 16)
        open(package_path, "wb").close()
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", narrowing_compile)
    with pytest.raises(RuntimeError, match=r"tokens\.shape\[1\] in \[2, 16\] \(exported as \[2, 512\]\)"):
        dilated_compile.aot_compile(program, (_tokens(7),), tmp_path / "lm.pt2")
    assert not (tmp_path / "lm.pt2").exists()


def test_argument_errors(tmp_path):
    model = TinyLM().eval()
    with pytest.raises(ValueError, match=r"must end in \.pt2"):
        dilated_compile.aot_compile(model, (_tokens(9),), tmp_path / "lm.so")
    with pytest.raises(TypeError, match="custom_domain"):
        dilated_compile.to_onnx(
            model, (_tokens(9),), tmp_path / "lm.onnx", custom_translation_table={}
        )
    with pytest.raises(TypeError, match="decompose"):
        dilated_compile.aot_compile(model, (_tokens(9),), tmp_path / "lm.pt2", decompose="yes")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("decompose", [None, True], ids=["kernels", "decomposed"])
def test_cuda_package_runs_without_the_library(tmp_path, decompose):
    """On CUDA the op's Triton kernels go into the package (decompose=None means False there);
    decompose=True compiles the aten decomposition instead. Head dim 32, which the kernels
    cover."""
    torch.manual_seed(0)
    model = TinyLM(dim=128, heads=4).eval().cuda()
    example = (_tokens(37).cuda(),)
    package = dilated_compile.aot_compile(
        model, example, tmp_path / "lm.pt2", dynamic_shapes={"tokens": {1: SEQ}},
        decompose=decompose,
    )
    inputs = [_tokens(n, seed=n).cuda() for n in LENGTHS]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    buffer = io.BytesIO()
    torch.save({"inputs": inputs, "expected": expected, "device": "cuda"}, buffer)
    cases = tmp_path / "cases.pt"
    cases.write_bytes(buffer.getvalue())
    report = _run_worker(str(cases), "--aoti", package)
    assert not report["dilated_compile_imported"]
    assert max(report["aoti"]) < 1e-3, report
