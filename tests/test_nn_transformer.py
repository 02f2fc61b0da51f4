"""Dilated transformer layers and LongNet: Sub-LN structure, MAGNETO init, masks, presets."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dilated_compile.nn import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LongNet,
    LongNetLM,
    magneto_gamma,
    magneto_gamma_encoder_decoder,
)

F64 = torch.float64
PATTERN = dict(segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4))


def _encoder_layer(**kwargs):
    torch.manual_seed(0)
    options = dict(dim_feedforward=48, dropout=0.0, activation="gelu", dtype=F64) | kwargs
    return DilatedTransformerEncoderLayer(32, 4, **PATTERN, **options)


def test_magneto_gammas():
    assert magneto_gamma(12) == pytest.approx(math.sqrt(math.log(24)))
    enc, dec = magneto_gamma_encoder_decoder(6, 12)
    assert enc == pytest.approx(math.sqrt(math.log(36) * math.log(12) / 3))
    assert dec == pytest.approx(math.sqrt(math.log(36)))
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        magneto_gamma(0)


def test_encoder_layer_is_sub_ln_with_magneto_init():
    layer = _encoder_layer(gamma_init=1.7, dim_feedforward=512)
    x = torch.randn(2, 21, 32, dtype=F64)
    h = layer.norm1(x)
    x1 = x + layer.self_attn(h, h, h, is_causal=True)[0]  # ends in its own LayerNorm + out_proj
    assert layer.self_attn.norm is not None
    ffn = layer.ffn
    expected = x1 + ffn.linear2(ffn.norm(F.gelu(ffn.linear1(layer.norm2(x1)))))
    torch.testing.assert_close(layer(x, is_causal=True), expected, rtol=0, atol=0)
    for linear, gain in ((ffn.linear1, 1.7), (ffn.linear2, 1.7), (layer.self_attn.v_proj, 1.7),
                         (layer.self_attn.q_proj, 1.0)):
        xavier = math.sqrt(2 / sum(linear.weight.shape))
        assert abs(linear.weight.std().item() / (gain * xavier) - 1) < 0.15
        assert linear.bias.abs().max() == 0


def test_encoder_layer_honours_masks_and_batch_first():
    layer = _encoder_layer()
    x = torch.randn(2, 19, 32, dtype=F64)
    padding = torch.zeros(2, 19, dtype=torch.bool)
    padding[1, 11:] = True
    out = layer(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out[1, :11], layer(x[1:, :11])[0], rtol=1e-12, atol=1e-12)
    # an attn_mask is honoured: forbidding every pair but the diagonal gives attention to self only
    eye = ~torch.eye(19, dtype=torch.bool)
    only_self = layer(x, src_mask=eye)
    h = layer.norm1(x)
    attn = layer.self_attn
    q, k, v = attn.project(h, h, h)
    x1 = x + attn.merge(v)
    torch.testing.assert_close(only_self, x1 + layer.ffn(layer.norm2(x1)), rtol=1e-12, atol=1e-12)
    seq_first = _encoder_layer(batch_first=False)
    torch.testing.assert_close(seq_first(x.transpose(0, 1), is_causal=True).transpose(0, 1),
                               layer(x, is_causal=True), rtol=0, atol=0)
    # nn.TransformerEncoder stacks them as it stacks its own layers
    stack = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    expected = stack.layers[1](stack.layers[0](x, is_causal=True), is_causal=True)
    torch.testing.assert_close(stack(x, is_causal=True), expected, rtol=0, atol=0)


def test_decoder_layer_structure_causality_and_errors():
    torch.manual_seed(0)
    layer = DilatedTransformerDecoderLayer(32, 4, **PATTERN, dim_feedforward=48, dropout=0.0, dtype=F64)
    tgt, memory = torch.randn(2, 23, 32, dtype=F64), torch.randn(2, 23, 32, dtype=F64)
    h = layer.norm1(tgt)
    x = tgt + layer.self_attn(h, h, h, is_causal=True)[0]
    x = x + layer.multihead_attn(layer.norm2(x), memory, memory)[0]
    expected = x + layer.ffn(layer.norm3(x))
    torch.testing.assert_close(layer(tgt, memory, tgt_is_causal=True), expected, rtol=0, atol=0)
    # causal in both attentions: position p sees nothing after p in tgt or memory
    out = layer(tgt, memory, tgt_is_causal=True, memory_is_causal=True)
    later = torch.randn(2, 8, 32, dtype=F64)
    changed = layer(torch.cat((tgt[:, :15], later), 1), torch.cat((memory[:, :15], later), 1),
                    tgt_is_causal=True, memory_is_causal=True)
    torch.testing.assert_close(changed[:, :15], out[:, :15], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="memory must have the shape of tgt"):
        layer(tgt, memory[:, :20])
    with pytest.raises(NotImplementedError, match="attention_dropout=0.1"):
        DilatedTransformerDecoderLayer(32, 4, **PATTERN, attention_dropout=0.1)(tgt.float(), memory.float())


def test_longnet_encoder_decoder_runs_causally_with_magneto_gains():
    torch.manual_seed(0)
    net = LongNet(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=48,
                  **PATTERN, positions="xpos", dtype=F64)
    gamma_encoder, gamma_decoder = magneto_gamma_encoder_decoder(2, 3)
    assert net.encoder_layers[0].gamma_init == pytest.approx(gamma_encoder)
    assert net.decoder_layers[0].gamma_init == pytest.approx(gamma_decoder)
    x = torch.randn(2, 27, 32, dtype=F64)
    out = net(x)
    assert out.shape == x.shape
    changed = net(torch.cat((x[:, :20], torch.randn(2, 7, 32, dtype=F64)), 1))
    torch.testing.assert_close(changed[:, :20], out[:, :20], rtol=1e-12, atol=1e-12)
    padding = torch.zeros(2, 27, dtype=torch.bool)
    padding[0, 17:] = True
    torch.testing.assert_close(net(x, src_key_padding_mask=padding, is_causal=False)[0, :17],
                               net(x[:1, :17], is_causal=False)[0], rtol=1e-12, atol=1e-12)


def test_paper_presets():
    lm = LongNetLM.from_preset("paper", num_tokens=1000, device="meta")
    assert lm.spec.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert lm.spec.dilation_rates == (1, 2, 4, 6, 12)
    assert (len(lm.layers), lm.d_model, lm.layers[0].self_attn.num_heads) == (12, 768, 12)
    assert lm.layers[0].ffn.linear1.out_features == 3072
    assert lm.position_embedding.block == 32768  # xPos, anchored on the largest segment
    assert lm.layers[0].gamma_init == pytest.approx(magneto_gamma(12))
    net = LongNet.from_preset("paper", num_decoder_layers=6, device="meta")
    assert (len(net.encoder_layers), len(net.decoder_layers)) == (12, 6)
    with pytest.raises(ValueError, match=r"unknown preset 'base'; available: \['paper'\]"):
        LongNetLM.from_preset("base", num_tokens=10)
    with pytest.raises(TypeError, match="LongNetLM is decoder-only.*num_layers"):
        LongNetLM(10, num_encoder_layers=12, num_decoder_layers=12, device="meta")
