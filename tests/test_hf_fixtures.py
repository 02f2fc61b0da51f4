"""Tiny transformers models and the float64 reference the Hugging Face tests compare against.

The reference is a float64 copy of a model whose attention is registered here (test only):
``dilated_compile.testing.dense_reference`` with the dilated count matrix of the layer's spec and
the mask transformers built (padding, causal). The tests in this file check the reference
itself: with a pattern that keeps every pair it is dense attention.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from dilated_compile import DilatedSpec  # noqa: E402
from dilated_compile.testing import dense_reference  # noqa: E402

VOCAB = 61
SPEC = DilatedSpec(segment_lengths=(4, 8), dilation_rates=(1, 2))  # L = lcm = 8
REFERENCE = "dilated_compile_test_reference"

# Small configs: hidden 32-48, 2 layers, grouped-query heads where the family has them, no
# dropout (dropout raises inside dilated regions), no sliding window; no end-of-sequence token,
# so that greedy generation runs for as many tokens as asked; pad id 0.
TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        attention_dropout=0.0, attn_implementation="sdpa", **TOKENS,
    )),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
        attention_dropout=0.0, use_sliding_window=False, attn_implementation="sdpa", **TOKENS,
    )),
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
        attention_dropout=0.0, sliding_window=None, attn_implementation="sdpa", **TOKENS,
    )),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa", **TOKENS,
    )),
}


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        is_causal=None, **kwargs):
    """Dense float64 dilated attention of one layer: ``dense_reference`` with the layer's spec
    (``config.reference_specs[layer_idx]``; None = dense SDPA semantics) and the mask."""
    assert dropout == 0.0
    spec = module.config.reference_specs[module.layer_idx]
    q_length = query.shape[2]
    causal = attention_mask is None and q_length > 1 and getattr(module, "is_causal", True)
    if spec is None:  # dense: every pair of one segment covering the sequence
        spec = DilatedSpec((key.shape[2],), (1,))
    out = dense_reference(
        query, key, value, spec, is_causal=causal, scale=scaling, enable_gqa=True,
        attn_mask=attention_mask,
    )
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def reference_copy(model: torch.nn.Module, specs) -> torch.nn.Module:
    """A float64 copy of ``model`` (taken before ``apply``) whose layer ``i`` attends with
    ``specs[i]`` (a spec for every layer, or one spec for all) through ``dense_reference``."""
    ref = copy.deepcopy(model).double()
    layers = ref.config.num_hidden_layers
    ref.config.reference_specs = list(specs) if isinstance(specs, (list, tuple)) else [specs] * layers
    ref.config._attn_implementation_internal = REFERENCE
    return ref


def padded_batch(batch: int = 2, length: int = 21, pads=(5, 0), seed: int = 1):
    """Left-padded token ids (pad id 0, tokens >= 1) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them from a left-padded mask."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def logits(model, ids, mask, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **kwargs).logits


# The cache argument of forward/generate: `past_key_values`, renamed `cache` in newer releases.
CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters
    else "past_key_values"
)


def greedy_matches_full_forward(model, out: torch.Tensor, prompt_mask: torch.Tensor) -> None:
    """Every generated token is the argmax of a full forward over the sequence before it."""
    prompt_length = prompt_mask.shape[1]
    new = out.shape[1] - prompt_length
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(out.shape[0], new)], dim=1)
    full = logits(model, out, mask)
    predicted = full[:, prompt_length - 1:-1].argmax(-1)
    assert torch.equal(predicted, out[:, prompt_length:]), (predicted, out[:, prompt_length:])


# ----------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reference_with_a_full_pattern_is_dense_attention(family):
    model = make_model(family)
    ids, mask = padded_batch()
    ref = reference_copy(model, None)  # None: one segment over the sequence, rate 1
    dense = copy.deepcopy(model).double()
    keep = mask.bool()
    torch.testing.assert_close(logits(ref, ids, mask)[keep], logits(dense, ids, mask)[keep])


def test_reference_differs_from_dense_with_a_dilated_pattern():
    model = make_model("llama")
    ids, mask = padded_batch()
    keep = mask.bool()
    difference = (logits(reference_copy(model, SPEC), ids, mask) - logits(model.double(), ids, mask))
    assert difference[keep].abs().max() > 1e-3
