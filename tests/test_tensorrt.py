"""``dilated_compile.tensorrt``: the lowering runs on CPU and leaves only ops that Torch-TensorRT
converts; ``compile`` names the extra to install when Torch-TensorRT is missing; on a GPU with
Torch-TensorRT the engine matches eager."""

from __future__ import annotations

import importlib.util
import operator

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import DilatedSpec, dilated
from dilated_compile.tensorrt import CONVERTED_OPS, lower

HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None


class Attention(torch.nn.Module):
    def __init__(self, spec: DilatedSpec, causal: bool):
        super().__init__()
        self.spec, self.causal = spec, causal

    def forward(self, q, k, v):
        with dilated(self.spec):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)


def _inputs(n, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = ((1, 6, n, 16), (1, 3, n, 16), (1, 3, n, 16))
    return tuple(torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)


SEQ = torch.export.Dim("seq", min=2, max=1024)
DYNAMIC = ({2: SEQ}, {2: SEQ}, {2: SEQ})


@pytest.mark.parametrize(
    "spec,causal,dtype",
    [
        (DilatedSpec((8, 16), (1, 4)), True, torch.float32),  # 6 heads, r=4: two head blocks
        (DilatedSpec((6, 20), (2, 3), mode="head_groups"), False, torch.float16),
    ],
)
def test_lowered_graph_holds_only_converted_ops(spec, causal, dtype):
    model = Attention(spec, causal)
    program = lower(model, _inputs(29, dtype), dynamic_shapes=DYNAMIC)
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert targets <= CONVERTED_OPS, sorted(map(str, targets - CONVERTED_OPS))
    assert operator.sub not in targets  # Torch-TensorRT converts no subtraction of sizes
    if dtype == torch.float32:
        for n in (2, 9, 29, 64):
            x = _inputs(n, dtype, seed=n)
            torch.testing.assert_close(program.module()(*x), model(*x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(HAS_TORCH_TENSORRT, reason="Torch-TensorRT is installed")
def test_compile_without_torch_tensorrt_names_the_extra():
    model = Attention(DilatedSpec((8,), (1,)), True)
    with pytest.raises(ImportError, match=r"dilated-compile\[tensorrt\]"):
        dilated_compile.tensorrt.compile(model, _inputs(16))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH_TENSORRT, reason="needs Torch-TensorRT")
def test_engine_matches_eager_at_several_lengths():
    import torch_tensorrt

    model = Attention(DilatedSpec((16, 32), (1, 2)), True)
    specs = [
        torch_tensorrt.Input(min_shape=(1, h, 2, 16), opt_shape=(1, h, 256, 16),
                             max_shape=(1, h, 1024, 16), dtype=torch.float32)
        for h in (6, 3, 3)
    ]
    engine = dilated_compile.tensorrt.compile(
        model, _inputs(100, device="cuda"), dynamic_shapes=DYNAMIC, arg_inputs=specs,
        min_block_size=1,
    )
    for n in (2, 37, 256, 1000):
        x = _inputs(n, seed=n, device="cuda")
        torch.testing.assert_close(engine(*x), model(*x), atol=2e-3, rtol=2e-3)
