"""DilatedAttention and masked_dilated_attention (the op with one mask) against the functional op
and the float64 reference."""

import math

import pytest
import torch

from dilated_compile import DilatedSpec, dilated_attention
from dilated_compile.nn import DilatedAttention, masked_dilated_attention
from dilated_compile.nn import masked as masked_module
from dilated_compile.ops import dilated_attention_op
from dilated_compile.testing import count_matrix, dense_reference

F64 = torch.float64
# Lengths that are no multiple of any segment; patterns that nest and that do not.
SPECS = [
    DilatedSpec((4, 8, 16), (1, 2, 4)),
    DilatedSpec((4, 6, 16), (1, 2, 3), "head_groups"),
    DilatedSpec((5, 12), (2, 3)),
]


def masked_reference(q, k, v, spec, *, is_causal=False, key_bias=None, attn_bias=None, scale=None):
    """Dilated attention with additive masks, densely in float64 from the count matrix."""
    batch, heads, n, d = q.shape
    group = heads // k.shape[1]
    k = k.to(F64).repeat_interleave(group, 1)
    v = v.to(F64).repeat_interleave(group, 1)
    scale = 1 / math.sqrt(d) if scale is None else scale
    counts = count_matrix(spec, n, heads, is_causal=is_causal)
    logits = scale * q.to(F64) @ k.transpose(-1, -2) + counts.to(F64).log()  # log 0 = -inf
    if key_bias is not None:
        logits = logits + key_bias.to(F64)[:, None, None, :]
    if attn_bias is not None:
        logits = logits + attn_bias.to(F64)
    top = logits.amax(-1, keepdim=True)
    weights = torch.exp(logits - torch.where(torch.isfinite(top), top, 0))
    denom = weights.sum(-1, keepdim=True)
    return weights @ v / torch.where(denom > 0, denom, 1)


def _qkv(batch, q_heads, kv_heads, n, d, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, n, d, generator=g, dtype=dtype)  # noqa: E731
    return make(q_heads), make(kv_heads), make(kv_heads)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kv_heads", [6, 2])
def test_dilated_attention_module_is_the_functional_op_in_bnhd_layout(spec, is_causal, kv_heads):
    q, k, v = _qkv(2, 6, kv_heads, 37, 8)
    module = DilatedAttention(spec.segment_lengths, spec.dilation_rates, mode=spec.mode, softmax_scale=0.3)
    out = module(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal)
    expected = dilated_attention(q, k, v, spec, is_causal=is_causal, scale=0.3, enable_gqa=kv_heads != 6)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=0, atol=0)
    reference = dense_reference(q, k, v, spec, is_causal=is_causal, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2), reference, rtol=1e-12, atol=1e-12)


def test_dilated_attention_module_refuses_what_it_cannot_honour():
    module = DilatedAttention((4, 8), (1, 2), attention_dropout=0.1)
    x = torch.randn(1, 10, 2, 4)
    with pytest.raises(NotImplementedError, match=r"attention_dropout=0.1 .*\.eval\(\)"):
        module(x, x, x)
    module.eval()  # dropout is the identity in eval mode: honoured exactly
    torch.testing.assert_close(module(x, x, x), DilatedAttention((4, 8), (1, 2))(x, x, x))
    with pytest.raises(ValueError, match=r"4-D \[batch, seq_len, heads, head_dim\], got \(10, 2, 4\)"):
        module(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="attention_dropout must be a probability"):
        DilatedAttention((4,), (1,), attention_dropout=1.5)
    with pytest.raises(ValueError, match="dilation_rates must not exceed"):
        DilatedAttention((2, 4), (4, 8))  # the argument order of another package, swapped


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_masked_path_without_masks_is_the_op(spec, is_causal):
    q, k, v = _qkv(2, 6, 3, 29, 8)
    out = masked_dilated_attention(q, k, v, spec, is_causal=is_causal)
    expected = dilated_attention(q, k, v, spec, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_masked_path_matches_the_masked_reference_with_gradients(spec, is_causal):
    q, k, v = _qkv(2, 6, 3, 31, 8)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    g = torch.Generator().manual_seed(1)
    key_bias = torch.zeros(2, 31, dtype=F64)
    key_bias[1, 20:] = float("-inf")  # padding: every row still has a key
    key_bias[0] = torch.randn(31, generator=g, dtype=F64)
    attn_bias = torch.randn(1, 6, 31, 31, generator=g, dtype=F64)
    attn_bias[..., 3, :] = float("-inf")  # a query row with no key at all gives 0
    out = masked_dilated_attention(q, k, v, spec, is_causal=is_causal, key_bias=key_bias, attn_bias=attn_bias)
    expected = masked_reference(q, k, v, spec, is_causal=is_causal, key_bias=key_bias, attn_bias=attn_bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out[:, :, 3].abs().max() == 0
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_masked_path_checks_its_biases():
    spec = DilatedSpec((4,), (1,))
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"key_bias must have shape \[B, N\] = \[1, 5\], got \(1, 6\)"):
        masked_dilated_attention(q, q, q, spec, key_bias=torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"attn_bias must broadcast to \[B, Hq, N, N\] = \[1, 2, 5, 5\]"):
        masked_dilated_attention(q, q, q, spec, attn_bias=torch.zeros(3, 5, 5))
    # One sequence: keys of another length (longer or shorter) are refused, naming the fix.
    for queries, keys in ((q, q[:, :, :4]), (q[:, :, :4], q)):
        with pytest.raises(
            ValueError,
            match=r"key and value must have the query's length \(one sequence length N = \d\), got key "
            r"seq_len \d.*dilated_compile\.dilated_attention\(.*attn_mask=",
        ):
            masked_dilated_attention(queries, keys, keys, spec)
    with pytest.raises(TypeError, match=r"key_bias must be floating point .*got torch.bool.*attn_mask=mask"):
        masked_dilated_attention(q, q, q, spec, key_bias=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match=r"attn_mask.detach\(\)"):
        masked_dilated_attention(q, q, q, spec, attn_bias=torch.zeros(5, 5, requires_grad=True))


def test_masked_path_is_the_op_with_one_mask(monkeypatch):
    """The biases reach the op as one float mask; a key bias alone stays [B, 1, 1, N]."""
    spec = DilatedSpec((4, 8), (1, 2))
    q, k, v = _qkv(2, 4, 2, 11, 8)
    key_bias = torch.zeros(2, 11, dtype=F64)
    key_bias[0, 7:] = float("-inf")
    calls = []

    def record(*args):
        calls.append(args)
        return dilated_attention_op(*args)

    monkeypatch.setattr(masked_module, "dilated_attention_op", record)
    out = masked_dilated_attention(q, k, v, spec, is_causal=True, key_bias=key_bias)
    (args,) = calls
    assert args[6] is True and args[8].shape == (2, 1, 1, 11) and args[8].dtype == F64
    expected = dense_reference(
        q, k, v, spec, is_causal=True, enable_gqa=True, attn_mask=key_bias[:, None, None, :]
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
