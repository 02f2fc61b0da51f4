"""``DilatedCache``: bounded memory, exact generation, and the caches dilated attention refuses."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_fixtures import (  # noqa: E402
    CACHE_ARGUMENT,
    FAMILIES,
    SPEC,
    greedy_matches_full_forward,
    logits,
    make_model,
    padded_batch,
    positions,
)
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from dilated_compile import DilatedSpec  # noqa: E402
from dilated_compile.apply_specs import apply  # noqa: E402
from dilated_compile.integrations.transformers import DilatedCache, set_config_spec  # noqa: E402

PERIOD = 8  # lcm(4, 8)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_with_the_bounded_cache_is_exact(family):
    model = make_model(family)
    ids, mask = padded_batch(length=6, pads=(2, 0))
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    with apply(model, SPEC):
        full = model.generate(ids, **kwargs)
        cache = DilatedCache(SPEC)
        bounded = model.generate(ids, **kwargs, **{CACHE_ARGUMENT: cache})
        assert torch.equal(bounded, full)  # token for token
        greedy_matches_full_forward(model, bounded, mask)
    assert cache.get_seq_length() == bounded.shape[1] - 1  # the last token is never fed back
    assert all(layer.num_held < PERIOD for layer in cache.layers)


@pytest.mark.parametrize(
    "spec",
    [
        DilatedSpec((4, 6), (1, 2)),  # not nested: the window is lcm(4, 6) = 12
        DilatedSpec((4, 8), (2, 4), mode="head_groups"),
    ],
    ids=["lcm", "head_groups"],
)
def test_step_by_step_and_chunked_decoding_stay_bounded_and_exact(spec):
    model = make_model("llama")
    period = DilatedCache(spec).period
    ids, mask = padded_batch(length=41, pads=(3, 0))
    with apply(model, spec):
        expected = logits(model, ids, mask)
        cache = DilatedCache(spec)
        # A prompt longer than the window, then one token, then chunks of 3, then one by one.
        bounds = [0, 13, 14, 17, 20, 23] + list(range(24, 42))
        for start, stop in zip(bounds, bounds[1:]):
            with torch.no_grad():
                out = model(
                    input_ids=ids[:, start:stop], attention_mask=mask[:, :stop],
                    position_ids=positions(mask)[:, start:stop], use_cache=True,
                    **{CACHE_ARGUMENT: cache},
                ).logits
            keep = mask[:, start:stop].bool()
            torch.testing.assert_close(out[keep], expected[:, start:stop][keep], atol=2e-5, rtol=1e-4)
            for layer in cache.layers:
                assert layer.num_held == stop - (stop // period) * period < period
                assert layer.start % period == 0
    assert cache.period == period


def test_memory_stays_flat():
    model = make_model("qwen2")
    ids, mask = padded_batch(length=4, pads=(0, 0))
    with apply(model, SPEC):
        sizes = []
        for new in (PERIOD * 3, PERIOD * 9):  # the same place in the window: 6 tokens held
            cache = DilatedCache(SPEC)
            model.generate(ids, attention_mask=mask, max_new_tokens=new + 3, do_sample=False,
                           pad_token_id=0, **{CACHE_ARGUMENT: cache})
            sizes.append(cache.nbytes)
    assert sizes[0] == sizes[1] > 0


def test_cache_from_config_and_from_the_apply_handle():
    source = make_model("llama")
    config = copy.deepcopy(source.config)
    set_config_spec(config, SPEC)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated_compile").eval()
    model.load_state_dict(source.state_dict())
    ids, mask = padded_batch(length=6, pads=(1, 0))
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs, **{CACHE_ARGUMENT: DilatedCache(model.config)})
    greedy_matches_full_forward(model, out, mask)

    other = DilatedSpec((2, 4), (1, 2))
    with apply(source, {"model.layers.0": SPEC, "model.layers.1": other}) as handle:
        cache = DilatedCache(handle)
        assert cache.period == 8
        out = source.generate(ids, **kwargs, **{CACHE_ARGUMENT: cache})
        greedy_matches_full_forward(source, out, mask)


def test_cache_from_a_handle_that_leaves_a_layer_dense_raises():
    model = make_model("llama")
    with apply(model, SPEC, modules="model.layers.0") as handle:
        with pytest.raises(ValueError, match="model.layers.1.self_attn are outside every region"):
            DilatedCache(handle)


def test_beam_search_with_the_bounded_cache():
    model = make_model("mistral")
    ids, mask = padded_batch(length=6, pads=(1, 0))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False)
    with apply(model, SPEC):
        full = model.generate(ids, **kwargs)
        bounded = model.generate(ids, **kwargs, **{CACHE_ARGUMENT: DilatedCache(SPEC)})
    assert torch.equal(bounded, full)


def test_crop_and_reset():
    model = make_model("llama")
    ids, mask = padded_batch(length=11, pads=(0, 0))
    cache = DilatedCache(SPEC)
    with apply(model, SPEC), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_ARGUMENT: cache})
    layer = cache.layers[0]
    assert (layer.get_seq_length(), layer.start, layer.num_held) == (11, 8, 3)
    cache.crop(-2)
    assert (layer.get_seq_length(), layer.num_held) == (9, 1)
    with pytest.raises(RuntimeError, match="dropped the tokens before position 8"):
        cache.crop(-2)
    cache.reset()
    assert (layer.get_seq_length(), layer.num_held, layer.start) == (0, 0, 0)


def test_cache_arguments_are_checked():
    with pytest.raises(TypeError, match="DilatedCache takes"):
        DilatedCache(42)
    config = copy.deepcopy(make_model("llama").config)
    with pytest.raises(ValueError, match="config.dilated_attention"):
        DilatedCache(config)
    sliding = MistralConfig(sliding_window=16)
    set_config_spec(sliding, SPEC)
    with pytest.raises(ValueError, match="sliding-window"):
        DilatedCache(sliding)


def test_static_cache_raises():
    model = make_model("llama")
    ids, mask = padded_batch(length=6, pads=(0, 0))
    with apply(model, SPEC), pytest.raises(ValueError, match="StaticCache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                       cache_implementation="static")


def test_sliding_window_cache_past_its_window_raises():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=10, attn_implementation="sdpa",
    )).eval()
    ids, mask = padded_batch(length=6, pads=(0, 0))
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with apply(model, SPEC):
        model.generate(ids, max_new_tokens=4, **kwargs)  # within the window: exact, allowed
        with pytest.raises(ValueError, match="sliding-window"):
            model.generate(ids, max_new_tokens=8, **kwargs)
