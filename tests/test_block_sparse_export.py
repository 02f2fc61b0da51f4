"""Block-sparse attention through export: the aten decomposition (exact, forward and backward, a
dynamic length with no guard on it), ``run_decompositions`` and ONNX (ONNX Runtime)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import BlockSparseSpec, block_sparse
from dilated_compile.export import dilated_op_nodes
from dilated_compile.ops.block_sparse_decompositions import (
    block_sparse_attention_backward_decomposition,
    block_sparse_attention_decomposition,
)
from dilated_compile.ops.decompositions import dilated_attention_decompositions
from dilated_compile.testing import dense_reference

F64 = torch.float64
SPECS = {
    "bigbird": BlockSparseSpec(8, local_blocks=1, global_blocks=1, random_blocks=2, seed=3),
    "band": BlockSparseSpec(8, local_blocks=2),
}


@pytest.mark.parametrize("seed", range(4))
def test_decompositions_are_exact_forward_and_backward(seed):
    rng = random.Random(seed)
    for trial in range(15):
        spec = BlockSparseSpec(
            rng.choice([1, 3, 4]), local_blocks=rng.choice([None, 0, 1]),
            global_blocks=rng.choice([0, 1, 2]), random_blocks=rng.choice([1, 2]), seed=trial,
        )
        nk = rng.randint(1, 30)
        nq = rng.choice([nk, rng.randint(1, nk)])
        causal = rng.random() < 0.5
        g = torch.Generator().manual_seed(trial)
        q = torch.randn(2, 4, nq, 5, generator=g, dtype=F64, requires_grad=True)
        k = torch.randn(2, 2, nk, 5, generator=g, dtype=F64, requires_grad=True)
        v = torch.randn(2, 2, nk, 3, generator=g, dtype=F64, requires_grad=True)
        mask = torch.rand(2, 1, 1, nk, generator=g) < 0.8 if rng.random() < 0.5 else None
        args = (spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks,
                spec.seed, None, causal, None, mask)
        out, lse = block_sparse_attention_decomposition(q, k, v, *args)
        ref_out, ref_lse = dense_reference(q, k, v, spec, is_causal=causal, enable_gqa=True,
                                           return_lse=True, attn_mask=mask)
        torch.testing.assert_close(out, ref_out, atol=1e-11, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=1e-11, rtol=0)
        go, gl = torch.randn_like(out), torch.randn_like(lse)
        finite = torch.isfinite(ref_lse)

        def loss(o, row_lse):
            return (o * go).sum() + (torch.where(finite, row_lse, 0.0) * torch.where(finite, gl, 0.0)).sum()

        want = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
        through = torch.autograd.grad(loss(out, lse), (q, k, v))
        explicit = block_sparse_attention_backward_decomposition(
            go, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), gl, *args)
        for a, b, w in zip(through, explicit, want):
            torch.testing.assert_close(a, w, atol=1e-10, rtol=0)
            torch.testing.assert_close(b, w, atol=1e-10, rtol=0)


def _model(spec):
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            with block_sparse(spec):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return Attention()


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g),
            torch.randn(1, 2, n, 8, generator=g))


SEQ = torch.export.Dim("seq", min=2, max=4096)
DYNAMIC = {"q": {2: SEQ}, "k": {2: SEQ}, "v": {2: SEQ}}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_decomposed_program_serves_every_length(name):
    spec = SPECS[name]
    program = dilated_compile.export(_model(spec), _inputs(50), dynamic_shapes=DYNAMIC)
    assert dilated_op_nodes(program) == ["dilated_compile::block_sparse_attention"]
    plain = program.run_decompositions(dilated_attention_decompositions())
    assert dilated_op_nodes(plain) == []
    for n in (2, 8, 9, 37, 130):  # one block, a block boundary, many blocks: no guard on N
        q, k, v = _inputs(n, seed=n)
        want = dense_reference(q, k, v, spec, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(plain.module()(q, k, v).double(), want, atol=2e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("custom_domain", [False, True])
def test_onnx_runs_in_onnx_runtime(tmp_path, custom_domain):
    ort = pytest.importorskip("onnxruntime")
    spec = SPECS["bigbird"]
    path = tmp_path / "block_sparse.onnx"
    # custom_domain=True keeps dilated calls as custom nodes; block-sparse calls are standard ops.
    dilated_compile.to_onnx(_model(spec), _inputs(50), path, dynamic_shapes=DYNAMIC,
                            custom_domain=custom_domain)
    session = ort.InferenceSession(str(path))
    for n in (3, 61):
        q, k, v = _inputs(n, seed=n)
        (out,) = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
        want = dense_reference(q, k, v, spec, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(torch.from_numpy(out).double(), want, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_an_aotinductor_package_serves_every_length(tmp_path):
    spec = SPECS["bigbird"]
    path = dilated_compile.aot_compile(_model(spec), _inputs(50), tmp_path / "block_sparse.pt2",
                                       dynamic_shapes=DYNAMIC)
    package = torch._inductor.aoti_load_package(str(path))
    for n in (2, 9, 77):
        q, k, v = _inputs(n, seed=n)
        want = dense_reference(q, k, v, spec, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(package(q, k, v).double(), want, atol=2e-6, rtol=0)
