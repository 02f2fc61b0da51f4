"""The nn modules with a BlockSparseSpec: exact against a hand-built float64 reference, eager ==
compiled, the factory's block-sparse kinds and the translation of earlier ports' sparse_config,
LongNet, and the errors of what stays dilated-only (bounded-cache decoding, xPos)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dilated_compile import BlockSparseSpec, DilatedSpec
from dilated_compile.nn import (
    BLOCK_SPARSE_KINDS,
    DilatedKVCache,
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LongNet,
    LongNetLM,
    MultiheadDilatedAttention,
    create_multihead_dilated_attention,
    resolve_kind,
    spec_from_sparse_config,
)
from dilated_compile.testing import block_layout, dense_reference

F64 = torch.float64
E, H, B, N = 24, 4, 3, 23

SPECS = {
    "band": BlockSparseSpec(4, local_blocks=1),
    "bigbird": BlockSparseSpec(4, local_blocks=1, global_blocks=1, random_blocks=2, seed=7),
    "layout": BlockSparseSpec(
        4, local_blocks=None, layout=torch.rand(H, 6, 6, generator=torch.Generator().manual_seed(5)) > 0.6
    ),
}


def _inputs(shape=(B, N, E), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(3)]


def _padding():
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 17:] = True
    mask[2, 6:] = True
    return mask


def _heads(proj: nn.Linear, x, heads):
    """``x`` [B, N, E] through ``proj`` by hand, as [B, heads, N, D]."""
    y = x @ proj.weight.T + proj.bias
    return y.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _hand_built(mhda, query, key, value, spec, *, is_causal=False, key_padding_mask=None, attn_mask=None):
    """Projections, dense_reference with the block-sparse spec, Sub-LN and the out projection,
    written out from the weights; masks turned into SDPA's convention by hand."""
    q = _heads(mhda.q_proj, query, mhda.num_heads)
    k = _heads(mhda.k_proj, key, mhda.num_kv_heads)
    v = _heads(mhda.v_proj, value, mhda.num_kv_heads)
    keep = None
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        keep = ~attn_mask if keep is None else keep & ~attn_mask
    heads = dense_reference(q, k, v, spec, is_causal=is_causal, enable_gqa=True, attn_mask=keep)
    x = heads.transpose(1, 2).reshape(query.shape[0], query.shape[1], mhda.embed_dim)
    if mhda.norm is not None:
        x = F.layer_norm(x, (mhda.embed_dim,), mhda.norm.weight, mhda.norm.bias, mhda.norm.eps)
    return x @ mhda.out_proj.weight.T + mhda.out_proj.bias


MASKS = {
    "plain": {},
    "causal": {"is_causal": True},
    "key_padding": {"key_padding_mask": _padding()},
    "causal_key_padding": {"is_causal": True, "key_padding_mask": _padding()},
    "attn_mask": {"attn_mask": (torch.rand(N, N, generator=torch.Generator().manual_seed(2)) > 0.8)},
}


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_block_sparse_module_matches_the_hand_built_float64_reference(spec, masks, num_kv_heads):
    torch.manual_seed(0)
    spec = SPECS[spec]
    mhda = MultiheadDilatedAttention(E, H, spec=spec, num_kv_heads=num_kv_heads, dtype=F64)
    with torch.no_grad():  # the module starts with zero biases: make them count
        for p in mhda.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y, z = _inputs()
    out, weights = mhda(x, y, z, **MASKS[masks])
    assert weights is None
    torch.testing.assert_close(out, _hand_built(mhda, x, y, z, spec, **MASKS[masks]), rtol=1e-12, atol=1e-12)


def test_float_key_padding_and_batch_first_false():
    spec = SPECS["bigbird"]
    mhda = MultiheadDilatedAttention(E, H, spec=spec, batch_first=False, dtype=F64)
    x, _, _ = _inputs((N, B, E))
    bias = torch.zeros(B, N, dtype=F64).masked_fill(_padding(), float("-inf"))
    out, _ = mhda(x, x, x, key_padding_mask=bias, is_causal=True)
    xb = x.transpose(0, 1)
    expected = _hand_built(mhda, xb, xb, xb, spec, is_causal=True, key_padding_mask=_padding())
    torch.testing.assert_close(out, expected.transpose(0, 1), rtol=1e-12, atol=1e-12)


def test_a_band_covering_the_sequence_gives_nn_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=F64)
    mhda = MultiheadDilatedAttention.from_multihead_attention(mha, spec=BlockSparseSpec(32))
    x, _, _ = _inputs()
    torch.testing.assert_close(
        mhda(x, x, x, key_padding_mask=_padding())[0],
        mha(x, x, x, key_padding_mask=_padding(), need_weights=False)[0],
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["bigbird", "layout"])
def test_compiled_equals_eager(spec):
    torch.manual_seed(0)
    mhda = MultiheadDilatedAttention(E, H, spec=SPECS[spec], num_kv_heads=2, dtype=F64)
    compiled = torch.compile(mhda, backend="dilated_compile")
    x = _inputs()[0].requires_grad_()
    for masks in ({}, {"key_padding_mask": _padding()}, {"is_causal": True, "key_padding_mask": _padding()}):
        eager_out = mhda(x, x, x, **masks)[0]
        compiled_out = compiled(x, x, x, **masks)[0]
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-12, atol=1e-12)
        eager_grad, = torch.autograd.grad(eager_out.square().sum(), x)
        compiled_grad, = torch.autograd.grad(compiled_out.square().sum(), x)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-11, atol=1e-11)
    # the SDPA calls were rewritten into the op (causal + mask calls the op directly)
    assert torch._dynamo.utils.counters["dilated_compile"]["sdpa_rewritten"] >= 2


def test_layout_is_a_non_persistent_buffer_that_follows_the_module():
    spec = SPECS["layout"]
    mhda = MultiheadDilatedAttention(E, H, spec=spec)
    assert mhda.pattern_layout is spec.layout and "pattern_layout" not in mhda.state_dict()
    mhda.double()
    assert mhda.spec is spec  # a bool buffer is not cast
    mhda.to("meta")
    assert mhda.spec.layout.device.type == "meta" and mhda.spec.layout is mhda.pattern_layout
    assert dataclasses.replace(mhda.spec, layout=spec.layout) == spec
    built_there = MultiheadDilatedAttention(E, H, spec=spec, device="meta")
    assert built_there.spec.layout.device.type == "meta" and spec.layout.device.type == "cpu"
    assert "pattern_layout" not in dict(MultiheadDilatedAttention(E, H, spec=SPECS["band"]).named_buffers())


def test_repr_and_the_layers_carry_the_spec():
    spec = SPECS["bigbird"]
    assert f"spec={spec!r}" in repr(MultiheadDilatedAttention(E, H, spec=spec))
    assert "segment_lengths=(4, 8)" in repr(MultiheadDilatedAttention(E, H, (4, 8), (1, 2)))
    encoder = DilatedTransformerEncoderLayer(E, H, spec=spec, dim_feedforward=32, dropout=0.0, dtype=F64)
    decoder = DilatedTransformerDecoderLayer(E, H, spec=spec, dim_feedforward=32, dropout=0.0, dtype=F64)
    assert encoder.self_attn.spec is spec
    assert decoder.self_attn.spec is spec and decoder.multihead_attn.spec is spec
    x, y, _ = _inputs()
    encoder(x, src_key_padding_mask=_padding(), is_causal=True)
    decoder(x, y, tgt_is_causal=True, memory_key_padding_mask=_padding())


def test_the_pattern_is_given_exactly_one_way():
    spec = SPECS["band"]
    both = r"MultiheadDilatedAttention: give the attention pattern one way, not both.*spec=BlockSparseSpec"
    with pytest.raises(TypeError, match=both):
        MultiheadDilatedAttention(E, H, (4,), (1,), spec=spec)
    with pytest.raises(TypeError, match=r"one way, not both.*mode='head_groups'"):
        MultiheadDilatedAttention(E, H, mode="head_groups", spec=spec)
    with pytest.raises(TypeError, match=r"segment_lengths=\.\.\., dilation_rates=\.\.\..*spec=DilatedSpec"):
        MultiheadDilatedAttention(E, H)
    with pytest.raises(TypeError, match=r"spec must be a BlockSparseSpec or a DilatedSpec, got tuple"):
        MultiheadDilatedAttention(E, H, spec=(4, 8))
    with pytest.raises(TypeError, match="DilatedTransformerEncoderLayer: give the attention pattern one way"):
        DilatedTransformerEncoderLayer(E, H, (4,), (1,), spec=spec)
    with pytest.raises(TypeError, match="LongNet: give the attention pattern one way"):
        LongNet(d_model=E, nhead=H, segment_lengths=(4,), spec=spec)
    with pytest.raises(ValueError, match="layout has 4 heads but the query has 2"):
        MultiheadDilatedAttention(E, 2, spec=SPECS["layout"])
    # a DilatedSpec works as spec= too, and equals the fields
    torch.manual_seed(0)
    by_spec = MultiheadDilatedAttention(E, H, spec=DilatedSpec((4, 8), (1, 2)), dtype=F64)
    by_fields = MultiheadDilatedAttention(E, H, (4, 8), (1, 2), dtype=F64)
    by_fields.load_state_dict(by_spec.state_dict())
    x, _, _ = _inputs()
    torch.testing.assert_close(by_spec(x, x, x, is_causal=True)[0], by_fields(x, x, x, is_causal=True)[0],
                               rtol=0, atol=0)


# --- the factory -----------------------------------------------------------------------------


def _same_module(module, spec, x, **masks):
    """``module`` has ``spec`` and computes what MultiheadDilatedAttention(spec=spec) computes."""
    assert isinstance(module, MultiheadDilatedAttention) and module.spec == spec
    plain = MultiheadDilatedAttention(E, H, spec=spec, dtype=F64)
    plain.load_state_dict(module.state_dict())
    torch.testing.assert_close(module(x, x, x, **masks)[0], plain(x, x, x, **masks)[0], rtol=0, atol=0)


def test_block_sparse_kind_from_fields_or_spec():
    x, _, _ = _inputs()
    fields = dict(block_size=4, local_blocks=1, global_blocks=1, random_blocks=2, seed=7)
    for kwargs in (fields, {"spec": BlockSparseSpec(**fields)}):
        for run in (None, "auto", "eager"):
            module = create_multihead_dilated_attention(
                "block_sparse", embed_dim=E, num_heads=H, run=run, dtype=F64, **kwargs
            )
            _same_module(module, SPECS["bigbird"], x, is_causal=True, key_padding_mask=_padding())
    # the defaults: BlockSparseSpec()
    default = create_multihead_dilated_attention("block_sparse", embed_dim=E, num_heads=H)
    assert default.spec == BlockSparseSpec()
    # the dilated kinds take spec= too, of either family
    module = create_multihead_dilated_attention(
        "eager", embed_dim=E, num_heads=H, spec=SPECS["band"], dtype=F64
    )
    _same_module(module, SPECS["band"], x)
    assert set(BLOCK_SPARSE_KINDS) == {"block_sparse", "block_sparse_ring"}
    assert resolve_kind("block_sparse", "cpu") == resolve_kind("block_sparse_ring", "cpu") == "eager"


@pytest.mark.slow
def test_block_sparse_kind_runs_compiled():
    module = create_multihead_dilated_attention(
        "block_sparse", embed_dim=E, num_heads=H, block_size=4, local_blocks=1, run="compiled", dtype=F64)
    x, _, _ = _inputs()
    with torch.no_grad():
        out, _ = module(x, x, x, is_causal=True)
        plain = MultiheadDilatedAttention(E, H, spec=SPECS["band"], dtype=F64)
        plain.load_state_dict(module.state_dict())
        torch.testing.assert_close(out, plain(x, x, x, is_causal=True)[0], rtol=1e-12, atol=1e-12)
    assert torch._dynamo.utils.counters["dilated_compile"]["sdpa_rewritten"] == 1


@dataclasses.dataclass
class SparsePatternConfig:
    """The fields of the earlier ports' config (the revision with ``window_size``)."""

    pattern_type: str = "local_window"
    block_size: int = 64
    sparsity_ratio: float = 0.1
    window_size: int = 256
    global_tokens: int = 1
    dilation_rates: list | None = None


def _port_layout(config, num_blocks):
    """The block pairs the earlier port's block-sparse ring module kept, from its generators:
    a window of ``(window_size // block_size) // 2`` blocks on each side; for global_local the
    first ``global_tokens`` blocks attend every block and every block attends them."""
    half = (config.window_size // config.block_size) // 2
    kept = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    g = min(config.global_tokens, num_blocks) if config.pattern_type == "global_local" else 0
    for i in range(num_blocks):
        if i < g:
            kept[i, :] = True
            kept[:, i] = True
        else:
            kept[i, max(0, i - half) : min(num_blocks, i + half + 1)] = True
    return kept


@pytest.mark.parametrize(
    "config",
    [
        SparsePatternConfig(),  # 256 / 64: an even multiple, 5 blocks
        SparsePatternConfig(window_size=192),  # an odd multiple: 3 blocks, the window
        SparsePatternConfig(window_size=300),  # not a multiple: 300 // 64 = 4 -> 5 blocks
        SparsePatternConfig(window_size=32),  # under one block: the diagonal
        SparsePatternConfig(pattern_type="global_local"),
        SparsePatternConfig(pattern_type="global_local", window_size=128, global_tokens=0),
        SparsePatternConfig("global_local", block_size=1, window_size=5, global_tokens=3),
    ],
    ids=repr,
)
def test_sparse_config_translation_is_the_earlier_ports_pattern(config):
    spec = spec_from_sparse_config(config)
    assert spec == spec_from_sparse_config(dataclasses.asdict(config))  # a dict works too
    half = config.window_size // (2 * config.block_size)
    assert spec.block_size == config.block_size and spec.local_blocks == half
    num_blocks = 11
    port = _port_layout(config, num_blocks)
    assert torch.equal(block_layout(spec, 1, num_blocks * config.block_size)[0], port)


def test_block_sparse_ring_kind_equals_the_explicit_spec():
    config = SparsePatternConfig(pattern_type="global_local", block_size=4, window_size=8, global_tokens=1)
    explicit = BlockSparseSpec(4, local_blocks=1, global_blocks=1)
    x, _, _ = _inputs()
    module = create_multihead_dilated_attention(
        "block_sparse_ring", embed_dim=E, num_heads=H, segment_lengths=[2048], dilation_rates=[1],
        sparse_config=config, dtype=F64)
    _same_module(module, explicit, x, is_causal=True, key_padding_mask=_padding())
    module = create_multihead_dilated_attention(
        attention_type="block_sparse_ring", embed_dim=E, num_heads=H,
        sparse_config=dataclasses.asdict(config), run="eager", dtype=F64,
    )
    _same_module(module, explicit, x)


def test_inexact_sparse_configs_raise_naming_the_field():
    with pytest.raises(NotImplementedError, match=r"pattern_type='dilated_sparse' has no exact equivalent.*"
                                                  r"random_blocks=\.\.\., seed=\.\.\..*DilatedSpec"):
        spec_from_sparse_config(SparsePatternConfig(pattern_type="dilated_sparse"))
    with pytest.raises(NotImplementedError, match="pattern_type='adaptive'.*sparsity_ratio"):
        spec_from_sparse_config(SparsePatternConfig(pattern_type="adaptive"))
    with pytest.raises(ValueError, match=r"global_tokens=4 does not translate exactly.*4 blocks.*"
                                          r"ceil\(4 / 64\) = 1.*global_blocks=\.\.\."):
        spec_from_sparse_config(SparsePatternConfig(pattern_type="global_local", global_tokens=4))
    with pytest.raises(NotImplementedError, match="local_window_size.*attend only the band"):
        spec_from_sparse_config({"pattern_type": "global_local", "block_size": 128,
                                 "local_window_size": 512, "global_tokens": 1})
    # that revision's local window translates like the other's
    assert spec_from_sparse_config(
        {"pattern_type": "local_window", "block_size": 128, "local_window_size": 512}
    ) == BlockSparseSpec(128, local_blocks=2)
    with pytest.raises(ValueError, match=r"one of \('local_window', 'global_local'\).*got 'spiral'"):
        spec_from_sparse_config(SparsePatternConfig(pattern_type="spiral"))
    with pytest.raises(ValueError, match="sparse_config.window_size must be an int >= 0, got -1"):
        spec_from_sparse_config(SparsePatternConfig(window_size=-1))
    with pytest.raises(TypeError, match="sparse_config has no field 'block_size'"):
        spec_from_sparse_config({"pattern_type": "local_window"})
    with pytest.raises(NotImplementedError, match="dilated_sparse"):
        create_multihead_dilated_attention("block_sparse_ring", embed_dim=E, num_heads=H,
                                           sparse_config=SparsePatternConfig(pattern_type="dilated_sparse"))


def test_factory_block_sparse_errors_name_the_problem():
    args = dict(embed_dim=E, num_heads=H)
    with pytest.raises(ValueError, match="kind='block_sparse_ring_distributed' names a sequence-parallel.*"
                                         "dilated_compile.sequence_parallel.*'block_sparse'"):
        create_multihead_dilated_attention("block_sparse_ring_distributed", **args)
    with pytest.raises(ValueError, match="kind='ring_distributed' names a sequence-parallel"):
        create_multihead_dilated_attention("ring_distributed", **args)
    with pytest.raises(TypeError, match="kind='block_sparse_ring' needs the pattern: sparse_config="):
        create_multihead_dilated_attention("block_sparse_ring", **args)
    with pytest.raises(TypeError, match=r"'block_sparse' takes no dilated pattern.*segment_lengths=\(4,\)"):
        create_multihead_dilated_attention("block_sparse", **args, segment_lengths=(4,), dilation_rates=(1,))
    one_way = r"one way: sparse_config, spec or the BlockSparseSpec fields.*\['block_size'\]"
    with pytest.raises(TypeError, match=one_way):
        create_multihead_dilated_attention(
            "block_sparse", **args, sparse_config=SparsePatternConfig(), block_size=4
        )
    with pytest.raises(TypeError, match="pass either spec or the fields of a BlockSparseSpec, not both"):
        create_multihead_dilated_attention("block_sparse", **args, spec=SPECS["band"], block_size=4)
    with pytest.raises(ValueError, match=r"run must be one of \('auto', 'eager', 'compiled'\).*got 'fast'"):
        create_multihead_dilated_attention("block_sparse", **args, run="fast")
    with pytest.raises(TypeError, match="run='eager' is an argument of the block-sparse kinds"):
        create_multihead_dilated_attention("auto", **args, run="eager")
    with pytest.raises(TypeError, match="sparse_config=.* is an argument of the block-sparse kinds"):
        create_multihead_dilated_attention("auto", **args, sparse_config={"pattern_type": "local_window"})
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['local_blocks'\].*block-sparse kinds"):
        create_multihead_dilated_attention("auto", **args, local_blocks=1)
    with pytest.raises(TypeError, match="run 'eager' resolved to 'eager', which compiles nothing"):
        create_multihead_dilated_attention(
            "block_sparse", **args, run="eager", compile_kwargs={"dynamic": True}
        )
    with pytest.raises(ValueError, match="BlockSparseSpec: local_blocks must be >= 0, got -1"):
        create_multihead_dilated_attention("block_sparse", **args, local_blocks=-1)


# --- LongNet ---------------------------------------------------------------------------------


def test_longnet_lm_with_a_block_sparse_spec_trains():
    torch.manual_seed(0)
    spec = BlockSparseSpec(8, local_blocks=1, global_blocks=1, random_blocks=1, seed=3)
    lm = LongNetLM(num_tokens=50, d_model=32, nhead=4, num_layers=2, dim_feedforward=64,
                   positions="rotary", spec=spec)
    assert lm.spec is spec and all(layer.self_attn.spec is spec for layer in lm.layers)
    tokens = torch.randint(0, 50, (2, 45))
    logits = lm(tokens[:, :-1])
    assert logits.shape == (2, 44, 50)
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lm.parameters())


def test_longnet_with_a_block_sparse_spec_trains_and_the_presets_take_a_spec():
    spec = BlockSparseSpec(8, local_blocks=1, global_blocks=1)
    net = LongNet(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                  positions="rotary", spec=spec)
    src = torch.randn(2, 30, 32, requires_grad=True)
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[1, 20:] = True
    net(src, src_key_padding_mask=padding).sum().backward()
    assert torch.isfinite(src.grad).all()
    # a spec replaces the preset's dilated pattern; the preset keeps working as before
    paper = LongNetLM.from_preset("paper", num_tokens=10, num_layers=1, positions="rotary", spec=spec)
    assert paper.spec is spec and paper.d_model == 768
    assert LongNetLM.from_preset("paper", num_tokens=10, num_layers=1).spec == DilatedSpec(
        (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
    assert LongNet(num_encoder_layers=1, num_decoder_layers=1).spec.segment_lengths[-1] == 32768
    with pytest.raises(ValueError, match="positions='xpos' needs a dilated pattern.*Pass positions='rotary'"):
        LongNetLM.from_preset("paper", num_tokens=10, num_layers=1, spec=spec)


def test_bounded_decoding_stays_dilated_only():
    spec = BlockSparseSpec(8, local_blocks=1)
    mhda = MultiheadDilatedAttention(E, H, spec=spec)
    x = torch.randn(1, 5, E)
    alternative = r"DilatedSpec\) only.*Call forward on the whole sequence"
    with pytest.raises(NotImplementedError, match=rf"MultiheadDilatedAttention.new_cache: .*{alternative}"):
        mhda.new_cache()
    dilated_cache = MultiheadDilatedAttention(E, H, (8,), (1,)).new_cache()
    with pytest.raises(NotImplementedError, match=rf"Attention.forward_cached: .*{alternative}"):
        mhda.forward_cached(x, dilated_cache)
    layer = DilatedTransformerEncoderLayer(E, H, spec=spec, dim_feedforward=32)
    with pytest.raises(NotImplementedError, match="forward_cached"):
        layer.forward_cached(x, dilated_cache)
    with pytest.raises(TypeError, match="DilatedKVCache: spec must be a DilatedSpec"):
        DilatedKVCache(spec)
    lm = LongNetLM(num_tokens=10, d_model=E, nhead=H, num_layers=1, dim_feedforward=32, positions="rotary",
                   spec=spec)
    tokens = torch.randint(0, 10, (1, 4))
    for name, call in (("new_cache", lm.new_cache), ("decode", lambda: lm.decode(tokens, None)),
                       ("generate", lambda: lm.generate(tokens, 2))):
        with pytest.raises(NotImplementedError, match=rf"LongNetLM.{name}: .*{alternative}"):
            call()
    with pytest.raises(ValueError, match="positions='xpos' needs a dilated pattern"):
        LongNetLM(num_tokens=10, d_model=E, nhead=H, num_layers=1, spec=spec)


def test_random_blocks_follow_the_spec_seed():
    # the seed fixes the random blocks: two modules with the same weights and seed agree,
    # another seed gives another pattern
    x, _, _ = _inputs()
    spec = SPECS["bigbird"]
    a = MultiheadDilatedAttention(E, H, spec=spec, dtype=F64)
    b = MultiheadDilatedAttention(E, H, spec=dataclasses.replace(spec), dtype=F64)
    c = MultiheadDilatedAttention(E, H, spec=dataclasses.replace(spec, seed=8), dtype=F64)
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x, x, x)[0], b(x, x, x)[0], rtol=0, atol=0)
    assert not torch.equal(block_layout(spec, H, N), block_layout(dataclasses.replace(spec, seed=8), H, N))
    assert not torch.allclose(a(x, x, x)[0], c(x, x, x)[0])


@pytest.mark.gpu
def test_block_sparse_kind_on_cuda_compiles_and_matches_float64():
    assert resolve_kind("block_sparse", "cuda") == "compiled"  # Triton ships with CUDA builds
    torch.manual_seed(0)
    layout = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    spec = BlockSparseSpec(64, local_blocks=1, global_blocks=1, random_blocks=1, seed=0, layout=layout)
    module = create_multihead_dilated_attention(
        "block_sparse", embed_dim=256, num_heads=4, spec=spec, num_kv_heads=2, device="cuda"
    )
    assert module.spec.layout.is_cuda and module.spec.layout is module.pattern_layout
    x = torch.randn(2, 300, 256, device="cuda")
    padding = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    padding[1, 210:] = True
    exact = MultiheadDilatedAttention(256, 4, spec=spec, num_kv_heads=2, dtype=F64).to("cuda")
    assert exact.spec.layout.is_cuda
    exact.load_state_dict(module.state_dict())
    causal_padding = {"is_causal": True, "key_padding_mask": padding}
    for masks in ({"is_causal": True}, {"key_padding_mask": padding}, causal_padding):
        with torch.no_grad():
            out, _ = module(x, x, x, **masks)
            expected, _ = exact(x.double(), x.double(), x.double(), **masks)
        torch.testing.assert_close(out, expected.float(), rtol=5e-3, atol=5e-3)  # TF32 matmuls
    assert torch._dynamo.utils.counters["dilated_compile"]["sdpa_rewritten"] >= 2
