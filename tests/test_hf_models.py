"""Hugging Face models through ``dilated_compile.apply`` and ``attn_implementation="dilated_compile"``:
padded batches, grouped-query heads, compilation, training, generation with the default cache.
Every number is checked against a float64 copy whose attention is the dense reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_fixtures import (  # noqa: E402
    FAMILIES,
    SPEC,
    VOCAB,
    greedy_matches_full_forward,
    logits,
    make_model,
    padded_batch,
    positions,
    reference_copy,
)
from torch._dynamo.utils import counters  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import dilated_compile  # noqa: E402
import dilated_compile.integrations.transformers as dct  # noqa: E402
from dilated_compile.apply_specs import apply  # noqa: E402
from dilated_compile.ops import dilated_attention_op  # noqa: E402

OTHER = dilated_compile.DilatedSpec(segment_lengths=(2, 4), dilation_rates=(1, 2))


def _close(actual, expected, mask):
    keep = mask.bool()  # padded positions attend no key: compare the real tokens only
    torch.testing.assert_close(actual[keep].double(), expected[keep], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padded_batch_matches_float64_reference(family):
    model = make_model(family)
    ref = reference_copy(model, SPEC)
    ids, mask = padded_batch(pads=(5, 0))
    with apply(model, SPEC):
        assert model.config._attn_implementation == dct.REGION_ATTENTION_NAME
        _close(logits(model, ids, mask), logits(ref, ids, mask), mask)
    # Removed: transformers' own SDPA again, and dense results.
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in model.__dict__
    dense = reference_copy(model, None)
    _close(logits(model, ids, mask), logits(dense, ids, mask), mask)


def test_per_layer_specs_and_the_deeper_match_wins():
    model = make_model("llama")
    ids, mask = padded_batch()
    ref = reference_copy(model, [SPEC, OTHER])
    with apply(model, {"*": SPEC, "model.layers.1": OTHER}) as handle:
        assert handle.specs == {"": SPEC, "model.layers.1": OTHER}
        _close(logits(model, ids, mask), logits(ref, ids, mask), mask)
    ref = reference_copy(model, [None, OTHER])  # layer 0 not selected: dense
    with apply(model, OTHER, modules="model.layers.1*"):
        _close(logits(model, ids, mask), logits(ref, ids, mask), mask)


def test_module_type_selects_the_attention_layers():
    model = make_model("qwen2")
    ids, mask = padded_batch()
    ref = reference_copy(model, SPEC)
    attention_type = type(model.model.layers[0].self_attn)
    with apply(model, SPEC, modules=attention_type) as handle:
        assert sorted(handle.specs) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        _close(logits(model, ids, mask), logits(ref, ids, mask), mask)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_equals_eager_with_no_extra_graph_breaks(family):
    model = make_model(family)
    ids, mask = padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions(mask))

    def compiled_run(backend):
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            out = torch.compile(model, backend=backend)(**kwargs).logits
        return out, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]

    _, plain_breaks, plain_graphs = compiled_run("dilated_compile_aot_eager")
    with apply(model, SPEC):
        eager = logits(model, ids, mask)
        # The backend's rewrite pass, then AOTAutograd with eager kernels: Inductor's code
        # generation for a whole model costs half a minute on a CI core (test_apply compiles a
        # small model with Inductor).
        compiled, breaks, graphs = compiled_run("dilated_compile_aot_eager")
        assert counters["dilated_compile"]["sdpa_rewritten"] == 2  # one per layer
    assert (breaks, graphs) == (plain_breaks, plain_graphs)
    keep = mask.bool()
    torch.testing.assert_close(compiled[keep], eager[keep], atol=1e-5, rtol=1e-5)


def test_export_holds_the_dilated_op():
    class Logits(torch.nn.Module):  # export takes tensors in, tensors out
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    model = make_model("llama")
    ids, mask = padded_batch()
    with apply(model, SPEC):
        expected = Logits(model)(ids, mask)
        program = dilated_compile.export(Logits(model), (ids, mask), strict=False)
    assert sum(node.target == dilated_attention_op for node in program.graph.nodes) == 2
    keep = mask.bool()
    torch.testing.assert_close(program.module()(ids, mask)[keep], expected[keep])


def test_training_step_gradients_match_float64_reference():
    model = make_model("llama").train()
    ref = reference_copy(model, SPEC).train()
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]

    def loss_of(m):
        # transformers' own loss upcasts to float32; this one keeps the reference in float64.
        out = m(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        return torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), labels.flatten())

    with apply(model, SPEC):
        loss = loss_of(model)
        loss.backward()
    ref_loss = loss_of(ref)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=2e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_training_step_with_activation_checkpointing(family):
    # The recomputation during backward runs outside the forward's regions: the attention
    # layers carry their spec and open the region themselves.
    model = make_model(family).train()
    ids, mask = padded_batch()
    with apply(model, SPEC):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for p, g in zip(model.parameters(), expected):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_dropout_in_training_raises():
    model = make_model("gpt2")
    model.config.attn_pdrop = 0.1
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.1
    model.train()
    ids, mask = padded_batch()
    with apply(model, SPEC), pytest.raises(NotImplementedError, match="dropout_p"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_with_the_default_cache_matches_full_forward(family):
    model = make_model(family)
    ids, mask = padded_batch(length=6, pads=(2, 0))
    with apply(model, SPEC):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                             pad_token_id=0)
        greedy_matches_full_forward(model, out, mask)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2 drops the flag before its attention
def test_output_attentions_raises(family):
    model = make_model(family)
    ids, mask = padded_batch()
    with apply(model, SPEC), pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_eager_attention_model_is_refused():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="attn_implementation=eager.*sdpa"):
        apply(model, SPEC)
    assert "forward" not in model.__dict__ and model.config._attn_implementation == "eager"


def test_from_config_with_the_registered_name(tmp_path):
    source = make_model("llama")
    config = copy.deepcopy(source.config)
    dct.set_config_spec(config, SPEC)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated_compile").eval()
    model.load_state_dict(source.state_dict())
    assert model.config._attn_implementation == "dilated_compile"
    ids, mask = padded_batch()
    _close(logits(model, ids, mask), logits(reference_copy(source, SPEC), ids, mask), mask)

    # The field is saved with the config and read back.
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["dilated_attention"]
    assert saved == {"segment_lengths": [4, 8], "dilation_rates": [1, 2], "mode": "mixture"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="dilated_compile").eval()
    assert dct.spec_from_config(loaded.config) == SPEC
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask))

    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    greedy_matches_full_forward(model, out, mask)


def test_from_config_without_a_spec_raises():
    config = copy.deepcopy(make_model("llama").config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated_compile")
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="config.dilated_attention"):
        model(input_ids=ids, attention_mask=mask)
