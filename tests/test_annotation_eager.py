"""``dilated(...)`` in eager mode: which calls it changes, and what it refuses."""

import threading

import pytest
import torch
import torch.nn.functional as F

from dilated_compile import DilatedSpec, dilated, dilated_attention
from dilated_compile.testing import dense_reference

SPEC = DilatedSpec((8, 16), (1, 2))
OTHER = DilatedSpec((5,), (1,), mode="head_groups")


def qkv(b=2, h=4, n=37, d=8, h_kv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv or h, n, d, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv or h, n, d, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
def test_context_manager_computes_dilated_attention(is_causal):
    q, k, v = qkv()
    with dilated(SPEC):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.3)
    ref = dense_reference(q, k, v, SPEC, is_causal=is_causal, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_positional_arguments_and_gqa():
    q, k, v = qkv(h=4, h_kv=2)
    with dilated(SPEC):
        out = F.scaled_dot_product_attention(q, k, v, None, 0.0, True, enable_gqa=True)
    ref = dense_reference(q, k, v, SPEC, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_decorator_and_gradients():
    q, k, v = (t.requires_grad_() for t in qkv())

    @dilated(SPEC)
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    out = attend(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = dense_reference(q, k, v, SPEC)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    assert attend.__name__ == "attend"


def test_unannotated_sdpa_untouched_before_inside_after():
    q, k, v = qkv(dtype=torch.float32)
    dense = F.scaled_dot_product_attention(q, k, v)
    with dilated(SPEC):
        pass
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), dense)
    with dilated(SPEC):
        inside = F.scaled_dot_product_attention(q, k, v)
        # Other torch functions pass through unchanged.
        assert torch.equal(torch.softmax(q, -1), torch.softmax(q, -1))
    assert not torch.allclose(inside, dense)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), dense)


def test_nested_regions_innermost_wins():
    q, k, v = qkv()
    with dilated(SPEC):
        with dilated(OTHER):
            inner = F.scaled_dot_product_attention(q, k, v)
        outer = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(inner, dilated_attention(q, k, v, OTHER), rtol=0, atol=0)
    torch.testing.assert_close(outer, dilated_attention(q, k, v, SPEC), rtol=0, atol=0)


def test_region_ends_when_an_exception_leaves_it():
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(KeyError):
        with dilated(SPEC):
            raise KeyError("boom")
    assert torch.equal(
        F.scaled_dot_product_attention(q, k, v),
        torch.ops.aten.scaled_dot_product_attention(q, k, v),
    )


def test_region_is_local_to_its_thread():
    q, k, v = qkv(dtype=torch.float32)
    seen = {}

    def other_thread():
        seen["out"] = F.scaled_dot_product_attention(q, k, v)

    with dilated(SPEC):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert torch.equal(seen["out"], torch.ops.aten.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(dropout_p=0.1), NotImplementedError, "dropout_p=0.1"),
        (dict(attn_mask=torch.zeros(37, 37, dtype=torch.float64, requires_grad=True)),
         NotImplementedError, "attn_mask.detach()"),
        (dict(attn_mask=torch.ones(37, 37, dtype=torch.bool), is_causal=True), ValueError,
         "fold the causal mask into attn_mask"),
        (dict(attn_mask=torch.ones(37, 36, dtype=torch.bool)), ValueError,
         r"attn_mask must broadcast to \[B, Hq, Nq, Nk\] = \[2, 4, 37, 37\]"),
        (dict(attn_mask=torch.ones(37, 37, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    ],
)
def test_unsupported_sdpa_arguments_raise(kwargs, error, message):
    q, k, v = qkv()
    with dilated(SPEC), pytest.raises(error, match=message):
        F.scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: qkv(h=4, h_kv=2), ValueError, "pass enable_gqa=True"),
        (lambda: qkv(h=3, h_kv=2), ValueError, "multiple of the number of key/value heads"),
        (lambda: (qkv(n=40)[0], qkv()[1], qkv()[2]), ValueError, "query seq_len <= key seq_len"),
        (lambda: (qkv()[0][0], qkv()[1], qkv()[2]), ValueError, "query must be 4-D"),
        (lambda: (qkv()[0].int(), qkv()[1], qkv()[2]), TypeError, "query must be float16"),
        (lambda: (qkv()[0].float(), qkv()[1], qkv()[2]), TypeError, "share a dtype"),
        (lambda: (qkv()[0], qkv(d=4)[1], qkv()[2]), ValueError, "share head_dim"),
        (lambda: (qkv()[0], qkv(b=1)[1], qkv(b=1)[2]), ValueError, "batch size"),
    ],
)
def test_bad_inputs_name_the_argument(make, error, message):
    q, k, v = make()
    with dilated(SPEC), pytest.raises(error, match=message):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(error, match=message):
        dilated_attention(q, k, v, SPEC)
    if "enable_gqa" not in message:  # the op itself takes GQA from the shapes
        with pytest.raises(error, match=message):
            torch.ops.dilated_compile.dilated_attention(
                q, k, v, [8, 16], [1, 2], "mixture", False, None
            )


def test_bad_op_pattern_arguments_raise():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dilation_rates"):
        torch.ops.dilated_compile.dilated_attention(q, k, v, [8, 16], [1], "mixture", False, None)
    with pytest.raises(ValueError, match="mode"):
        torch.ops.dilated_compile.dilated_attention(q, k, v, [8], [1], "dense", False, None)
    with pytest.raises(TypeError, match="value must be a torch.Tensor"):
        dilated_attention(q, k, "v", SPEC)


def test_head_groups_with_too_few_heads_raises():
    q, k, v = qkv(h=1)
    spec = DilatedSpec((8, 16), (1, 2), mode="head_groups")
    with dilated(spec), pytest.raises(ValueError, match="at least one query head per config"):
        F.scaled_dot_product_attention(q, k, v)


def test_multihead_attention_inside_region_raises_instead_of_staying_dense():
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 10, 16)
    for training in (True, False):
        mha.train(training)
        with dilated(SPEC), pytest.raises(NotImplementedError, match="nn.MultiheadAttention"):
            mha(x, x, x, need_weights=False)


def test_functional_rejects_non_spec():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="spec must be a DilatedSpec"):
        dilated_attention(q, k, v, ((8,), (1,)))


def test_inputs_on_different_devices_raise():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="must be on one device"):
        dilated_attention(q, k.to("meta"), v, SPEC)
