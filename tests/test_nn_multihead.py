"""MultiheadDilatedAttention: parity with nn.MultiheadAttention, the float64 reference, masks
honoured (through the op) or refused, state_dict, eager == compiled."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dilated_compile
from dilated_compile import DilatedSpec
from dilated_compile.nn import MultiheadDilatedAttention, XPos
from dilated_compile.ops import dilated_attention as op_module
from dilated_compile.ops import dilated_attention_op
from dilated_compile.ops import dilated_attention_pytorch as pytorch_impl
from dilated_compile.testing import dense_reference

from test_nn_attention import masked_reference

F64 = torch.float64
E, H, N, B = 24, 4, 13, 3


def _pair(batch_first=True, bias=True, seed=0):
    """nn.MultiheadAttention and a MultiheadDilatedAttention with its weights whose one config
    (w >= N, r = 1) is dense attention."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, dtype=F64)
    with torch.no_grad():  # nn.MultiheadAttention starts with zero biases
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mhda = MultiheadDilatedAttention.from_multihead_attention(mha, segment_lengths=(16,), dilation_rates=(1,))
    return mha, mhda


def _inputs(shape=(B, N, E), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(3)]


def _no_empty_rows(mask):
    return mask.fill_diagonal_(False)  # nn.MultiheadAttention gives NaN for a row with no key


def _padding(dtype=torch.bool):
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 9:] = True
    mask[2, 4:] = True
    return mask if dtype == torch.bool else torch.zeros(B, N, dtype=dtype).masked_fill(mask, float("-inf"))


def test_weights_copied_by_hand_give_nn_multihead_attention():
    mha, _ = _pair()
    mhda = MultiheadDilatedAttention(E, H, (N,), (1,), layer_norm=False, dtype=F64)
    with torch.no_grad():
        for proj, w, b in zip((mhda.q_proj, mhda.k_proj, mhda.v_proj), mha.in_proj_weight.chunk(3),
                              mha.in_proj_bias.chunk(3)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        mhda.out_proj.load_state_dict(mha.out_proj.state_dict())
    q, k, v = _inputs()
    torch.testing.assert_close(mhda(q, k, v)[0], mha(q, k, v, need_weights=False)[0], rtol=1e-13, atol=1e-13)


CASES = {
    "plain": ({}, {}),
    "causal": (
        {"is_causal": True},
        {"is_causal": True, "attn_mask": nn.Transformer.generate_square_subsequent_mask(N, dtype=F64)},
    ),
    "key_padding_bool": ({"key_padding_mask": _padding()}, None),
    "key_padding_float": ({"key_padding_mask": _padding(F64)}, None),
    "attn_mask_bool_2d": (
        {"attn_mask": _no_empty_rows(torch.rand(N, N, generator=torch.Generator().manual_seed(2)) > 0.7)},
        None,
    ),
    "attn_mask_float_3d": (
        {"attn_mask": torch.randn(B * H, N, N, generator=torch.Generator().manual_seed(3), dtype=F64)},
        None,
    ),
    "both_masks": (
        {
            "key_padding_mask": _padding(F64),
            "attn_mask": torch.randn(N, N, generator=torch.Generator().manual_seed(4), dtype=F64),
        },
        None,
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_parity_with_nn_multihead_attention(case, batch_first):
    ours_kwargs, theirs_kwargs = CASES[case]
    theirs_kwargs = ours_kwargs if theirs_kwargs is None else theirs_kwargs
    mha, mhda = _pair(batch_first=batch_first)
    shape = (B, N, E) if batch_first else (N, B, E)
    q, k, v = _inputs(shape)
    expected, _ = mha(q, k, v, need_weights=False, **theirs_kwargs)
    out, weights = mhda(q, k, v, **ours_kwargs)
    assert weights is None
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_parity_unbatched_and_without_bias():
    mha, mhda = _pair(bias=False)
    q, k, v = _inputs((N, E))
    mask = torch.zeros(N, dtype=torch.bool)
    mask[10:] = True
    expected, _ = mha(q, k, v, key_padding_mask=mask, need_weights=False)
    torch.testing.assert_close(mhda(q, k, v, key_padding_mask=mask)[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "spec", [DilatedSpec((4, 8), (1, 2)), DilatedSpec((4, 6), (1, 2), "head_groups")], ids=str
)
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_dilated_config_matches_the_float64_reference(spec, num_kv_heads):
    torch.manual_seed(0)
    mhda = MultiheadDilatedAttention(
        E, H, spec.segment_lengths, spec.dilation_rates, mode=spec.mode, num_kv_heads=num_kv_heads, dtype=F64
    )
    x, y, _ = _inputs((B, 21, E))
    out, _ = mhda(x, y, y, is_causal=True)
    q, k, v = mhda.project(x, y, y)
    assert k.shape[1] == (num_kv_heads or H)
    expected = mhda.merge(dense_reference(q, k, v, spec, is_causal=True, enable_gqa=True))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # with key padding: compare with the masked reference
    padding = _padding()[:, :13].repeat(1, 2)[:, :21]
    out, _ = mhda(x, y, y, key_padding_mask=padding, is_causal=True)
    bias = torch.zeros(B, 21, dtype=F64).masked_fill(padding, float("-inf"))
    expected = mhda.merge(masked_reference(q, k, v, spec, is_causal=True, key_bias=bias))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_right_padding_gives_each_sequence_its_own_result():
    torch.manual_seed(0)
    mhda = MultiheadDilatedAttention(E, H, (4, 8, 16), (1, 2, 4), dtype=F64)
    x, _, _ = _inputs((2, 23, E))
    padding = torch.zeros(2, 23, dtype=torch.bool)
    padding[1, 14:] = True  # sequence 1 has 14 tokens; 14 is inside the second 8-segment
    for is_causal in (False, True):
        out, _ = mhda(x, x, x, key_padding_mask=padding, is_causal=is_causal)
        alone, _ = mhda(x[1:, :14], x[1:, :14], x[1:, :14], is_causal=is_causal)
        torch.testing.assert_close(out[1:, :14], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            out[:1], mhda(x[:1], x[:1], x[:1], is_causal=is_causal)[0], rtol=1e-12, atol=1e-12
        )


def test_arguments_it_cannot_honour_are_refused():
    mhda = MultiheadDilatedAttention(E, H, (4, 8), (1, 2), dropout=0.1)
    x = torch.randn(B, N, E)
    with pytest.raises(NotImplementedError, match=r"need_weights=True.*Pass need_weights=False"):
        mhda(x, x, x, need_weights=True)
    with pytest.raises(NotImplementedError, match=r"dropout=0.1 cannot be honoured in training mode"):
        mhda(x, x, x)
    mhda.eval()
    mhda(x, x, x)  # eval: dropout is the identity
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[batch, seq_len\] = \[3, 13\]"):
        mhda(x, x, x, key_padding_mask=torch.zeros(B, N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \[N, N\] = \[13, 13\]"):
        mhda(x, x, x, attn_mask=torch.zeros(N, N + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool .* or floating point"):
        mhda(x, x, x, key_padding_mask=torch.zeros(B, N, dtype=torch.int64))
    memory = torch.randn(B, N + 5, E)
    with pytest.raises(ValueError, match="key must have the query's batch and length.*nn.MultiheadAttention"):
        mhda(x, memory, memory)
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be a multiple of num_heads \(4\)"):
        MultiheadDilatedAttention(10, 4, (4,), (1,))
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        MultiheadDilatedAttention(E, 4, (4,), (1,), num_kv_heads=3)
    with pytest.raises(ValueError, match="head_groups"):
        MultiheadDilatedAttention(E, 2, (4, 8, 16), (1, 2, 4), mode="head_groups")


def test_magneto_initialisation_and_state_dict_round_trip():
    torch.manual_seed(0)
    mhda = MultiheadDilatedAttention(
        256, 8, (64, 128), (1, 2), gamma_init=2.0, num_kv_heads=4, position_embedding=XPos(32, block=128)
    )
    xavier = lambda linear: (2 / sum(linear.weight.shape)) ** 0.5  # noqa: E731
    for proj, gain in ((mhda.q_proj, 1), (mhda.k_proj, 1), (mhda.v_proj, 2), (mhda.out_proj, 2)):
        assert abs(proj.weight.std().item() / (gain * xavier(proj)) - 1) < 0.05
        assert proj.bias.abs().max() == 0
    state = mhda.state_dict()
    assert sorted(state) == sorted(
        f"{name}.{p}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj", "norm")
        for p in ("weight", "bias")
    )
    clone = MultiheadDilatedAttention(
        256, 8, (64, 128), (1, 2), num_kv_heads=4, position_embedding=XPos(32, block=128)
    )
    clone.load_state_dict(state)
    x = torch.randn(2, 150, 256)
    torch.testing.assert_close(
        clone(x, x, x, is_causal=True)[0], mhda(x, x, x, is_causal=True)[0], rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "masked,is_causal,rewritten",
    # A causal masked call runs the op itself (SDPA refuses a mask with is_causal=True), so
    # there is no SDPA to rewrite; the others are annotated SDPA, rewritten into the op.
    [(False, True, 1), (True, True, 0), (True, False, 1)],
)
def test_eager_equals_compiled_forward_and_backward(masked, is_causal, rewritten):
    torch.manual_seed(0)
    mhda = MultiheadDilatedAttention(
        E, H, (4, 8, 16), (1, 2, 4), num_kv_heads=2, position_embedding=XPos(E // H, block=16)
    )
    x = torch.randn(B, 37, E, requires_grad=True)
    padding = torch.zeros(B, 37, dtype=torch.bool)
    padding[1, 30:] = True
    kwargs = {"is_causal": is_causal, "key_padding_mask": padding if masked else None}

    def loss_and_grads(module):
        out, _ = module(x, x, x, **kwargs)
        grads = torch.autograd.grad((out * out).sum(), [x, *mhda.parameters()])
        return out, grads

    eager_out, eager_grads = loss_and_grads(mhda)
    compiled = torch.compile(mhda, backend="dilated_compile_aot_eager", fullgraph=True)
    out, grads = loss_and_grads(compiled)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["dilated_compile"]["sdpa_rewritten"] == rewritten


# --- masks go through the op ----------------------------------------------------------------------

_OP_BODIES = {  # the library's custom ops and the Python functions that implement them
    definition._opoverload: definition._init_fn
    for definition in (
        op_module.dilated_attention_forward,
        op_module.dilated_attention_backward,
        pytorch_impl.dilated_attention_pytorch,
        pytorch_impl.dilated_attention_backward_pytorch,
    )
}


class _OpsAndLargestAllocation(TorchDispatchMode):
    """The library ops called, and the largest storage created (in elements; the given inputs
    do not count), inside those ops too: their Python bodies run under the mode, which an
    opaque custom op would otherwise hide."""

    def __init__(self, *inputs):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in inputs}
        self.ops = []
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = _OP_BODIES.get(func)
        if body is None:
            out = func(*args, **(kwargs or {}))
        else:
            self.ops.append(func)
            with self:
                out = body(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.elements = max(self.elements, t.untyped_storage().nbytes() // t.element_size())
        return out


def _reference_mask(key_padding_mask, attn_mask=None):
    """nn.MultiheadAttention's masks (True / -inf = masked out) as one SDPA-convention mask
    ``[B, H, N, N]`` for the dense reference, built densely on purpose."""
    masks = [key_padding_mask[:, None, None, :].expand(B, H, N, N)]
    if attn_mask is not None:
        masks.append(attn_mask.reshape(-1, N, N).expand(B * H, N, N).reshape(B, H, N, N))
    if all(m.dtype == torch.bool for m in masks):
        return ~torch.stack(masks).any(0)
    biases = [
        torch.zeros(m.shape, dtype=F64).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m
        for m in masks
    ]
    return sum(biases)


def _random_bool(*shape, seed, p):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize("is_causal", [False, True])
def test_masked_calls_run_the_op_eager_and_compiled(is_causal):
    torch.manual_seed(0)
    mhda = MultiheadDilatedAttention(E, H, (4, 8), (1, 2), num_kv_heads=2, dtype=F64)
    x, _, _ = _inputs()
    with _OpsAndLargestAllocation() as record:
        mhda(x, x, x, key_padding_mask=_padding(), is_causal=is_causal)
    assert record.ops.count(dilated_attention_op) == 1
    report = dilated_compile.explain(mhda, x, x, x, key_padding_mask=_padding(), is_causal=is_causal)
    (op_node,) = [n for n in report.after.graph.nodes if n.target is dilated_attention_op]
    assert len(op_node.args) == 9 and op_node.args[6] is is_causal  # the mask is the op's argument
    assert not [n for n in report.after.graph.nodes if "scaled_dot_product" in str(n.target)]
    # Non-causal calls are annotated SDPA the rewrite sees; causal ones are the op already.
    assert len(report.rewrites) == (0 if is_causal else 1)


@pytest.mark.parametrize(
    "masks",
    [
        {"key_padding_mask": _padding()},
        {"key_padding_mask": _padding(F64), "attn_mask": _random_bool(N, N, seed=5, p=0.3)},
        {"key_padding_mask": _padding(), "attn_mask": _random_bool(B * H, N, N, seed=6, p=0.2)},
    ],
    ids=["padding", "float_padding_and_bool_mask", "padding_and_per_head_mask"],
)
def test_causal_masked_calls_equal_the_dense_reference_with_gradients(masks):
    torch.manual_seed(0)
    spec = DilatedSpec((4, 8), (1, 2))
    mhda = MultiheadDilatedAttention(E, H, spec.segment_lengths, spec.dilation_rates, dtype=F64)
    x, _, _ = _inputs()
    x.requires_grad_()
    out, _ = mhda(x, x, x, is_causal=True, **masks)
    q, k, v = mhda.project(x, x, x)
    mask = _reference_mask(masks["key_padding_mask"], masks.get("attn_mask"))
    expected = mhda.merge(dense_reference(q, k, v, spec, is_causal=True, attn_mask=mask))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    inputs = [x, *mhda.parameters()]
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_causal_key_padding_at_a_long_length_allocates_no_n_by_n_tensor():
    n = 4096
    torch.manual_seed(0)
    mhda = MultiheadDilatedAttention(16, 2, (32, 64), (1, 2), dtype=F64)
    x = torch.randn(2, n, 16, dtype=F64, requires_grad=True)
    padding = torch.zeros(2, n, dtype=torch.bool)
    padding[1, 3000:] = True
    largest = {}
    for name, mask in (("unmasked", None), ("masked", padding)):
        with _OpsAndLargestAllocation(x, padding, *mhda.parameters()) as record:
            out, _ = mhda(x, x, x, key_padding_mask=mask, is_causal=True)
            out.sum().backward()
        assert record.ops.count(dilated_attention_op) == 1
        largest[name] = record.elements
    # Key padding adds nothing larger than the op's own tiles (N * w per head), never N x N.
    assert largest["masked"] <= largest["unmasked"] < n * n // 16
