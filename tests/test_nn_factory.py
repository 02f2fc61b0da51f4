"""create_multihead_dilated_attention: every kind it returns is exact; errors are loud."""

import importlib.util

import pytest
import torch

from dilated_compile.nn import (
    KINDS,
    MultiheadDilatedAttention,
    create_multihead_dilated_attention,
    resolve_kind,
)

ARGS = dict(embed_dim=32, num_heads=4, segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4))


def _reference(module, x, **kwargs):
    plain = MultiheadDilatedAttention(**ARGS, **kwargs)
    plain.load_state_dict(module.state_dict())  # compiled in place: the same state_dict keys
    return plain(x, x, x, is_causal=True)[0]


def test_auto_picks_eager_on_cpu_and_compiled_on_cuda_with_triton(monkeypatch):
    assert resolve_kind("auto", "cpu") == "eager"
    assert resolve_kind("improved", "cpu") == resolve_kind("standard") == "eager"
    has_triton = importlib.util.find_spec("triton") is not None
    assert resolve_kind("auto", "cuda") == ("compiled" if has_triton else "eager")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert resolve_kind("auto", "cuda") == "eager"
    assert resolve_kind("compiled", "cpu") == "compiled" and resolve_kind("eager", "cuda") == "eager"


@pytest.mark.parametrize("kind", ["auto", "eager", "improved"])
def test_eager_kinds_are_exact(kind):
    torch.manual_seed(0)
    module = create_multihead_dilated_attention(kind, **ARGS, num_kv_heads=2, dtype=torch.float64)
    assert isinstance(module, MultiheadDilatedAttention) and module.num_kv_heads == 2
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    torch.testing.assert_close(
        module(x, x, x, is_causal=True)[0],
        _reference(module, x, num_kv_heads=2, dtype=torch.float64),
        rtol=0,
        atol=0,
    )


@pytest.mark.slow
def test_compiled_kind_is_exact():
    torch.manual_seed(0)
    module = create_multihead_dilated_attention(attention_type="compiled", **ARGS)
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        out, _ = module(x, x, x, is_causal=True)
        expected = _reference(module, x)
    assert torch._dynamo.utils.counters["dilated_compile"]["sdpa_rewritten"] == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_factory_errors_name_the_problem():
    assert KINDS == ("auto", "eager", "compiled")
    with pytest.raises(ValueError, match=r"kind must be one of \('auto', 'eager', 'compiled'\).*got 'fast'"):
        create_multihead_dilated_attention("fast", **ARGS)
    with pytest.raises(ValueError, match="kind='ring' names a sequence-parallel or distributed variant"):
        create_multihead_dilated_attention("ring", **ARGS)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['use_xformers'\]"):
        create_multihead_dilated_attention(**ARGS, use_xformers=True)
    with pytest.raises(TypeError, match="kind must be a string.*by keyword"):
        create_multihead_dilated_attention(32, 4, (1, 2), (4, 8))  # another package's positional order
    with pytest.raises(TypeError, match="pass kind or attention_type"):
        create_multihead_dilated_attention("eager", attention_type="compiled", **ARGS)
    with pytest.raises(TypeError, match="compiles nothing"):
        create_multihead_dilated_attention("eager", compile_kwargs={"dynamic": True}, **ARGS)


@pytest.mark.gpu
def test_auto_kind_on_cuda_compiles_and_matches_float64():
    assert resolve_kind("auto", "cuda") == "compiled"  # Triton ships with CUDA builds of PyTorch
    torch.manual_seed(0)
    args = dict(embed_dim=256, num_heads=8, segment_lengths=(64, 128), dilation_rates=(1, 2))
    module = create_multihead_dilated_attention("auto", **args, device="cuda")
    x = torch.randn(2, 300, 256, device="cuda")
    with torch.no_grad():
        out, _ = module(x, x, x, is_causal=True)
        exact = MultiheadDilatedAttention(**args, device="cuda", dtype=torch.float64)
        exact.load_state_dict(module.state_dict())
        expected, _ = exact(x.double(), x.double(), x.double(), is_causal=True)
    torch.testing.assert_close(out, expected.float(), rtol=5e-3, atol=5e-3)  # TF32 matmuls
