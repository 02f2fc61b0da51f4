"""Hugging Face transformers: dilated attention in ``PreTrainedModel``s, and a bounded cache.

Importing this module (``dilated_compile.apply`` does it for transformers models) registers two
attention implementations in transformers' ``AttentionInterface``, each with the mask function
of ``AttentionMaskInterface`` that it needs:

- ``"dilated_compile"``: dilated attention with the pattern of ``config.dilated_attention``
  (a dict saved with the config)::

      import dilated_compile.integrations.transformers
      config.dilated_attention = {"segment_lengths": [2048, 4096], "dilation_rates": [1, 2],
                                  "mode": "mixture"}
      model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated_compile")

- ``"dilated_compile_sdpa"``: one plain SDPA call with the real grouped-query heads; dilated
  inside ``dilated(...)`` regions, dense outside. ``dilated_compile.apply`` switches
  ``attn_implementation="sdpa"`` models to it and ``.remove()`` switches them back.

``DilatedCache`` keeps per layer only the keys later queries can attend, so ``generate`` runs in
memory that does not grow with the sequence. See ``docs/huggingface.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from ...apply_specs import innermost_spec
from .attention import (
    ATTENTION_NAME,
    check_attention_arguments,
    REGION_ATTENTION_NAME,
    SPEC_ATTRIBUTE,
    config_attention_forward,
    dilated_sdpa_mask,
    region_attention_forward,
)
from .cache import DilatedCache, DilatedLayer
from .config import CONFIG_FIELD, set_config_spec, spec_from_config

__all__ = [
    "ATTENTION_NAME",
    "CONFIG_FIELD",
    "DilatedCache",
    "DilatedLayer",
    "REGION_ATTENTION_NAME",
    "config_attention_forward",
    "region_attention_forward",
    "set_config_spec",
    "spec_from_config",
]

AttentionInterface.register(ATTENTION_NAME, config_attention_forward)
AttentionInterface.register(REGION_ATTENTION_NAME, region_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, dilated_sdpa_mask)
AttentionMaskInterface.register(REGION_ATTENTION_NAME, dilated_sdpa_mask)

# Implementations apply switches to REGION_ATTENTION_NAME ("dilated_compile" too: apply's specs
# replace the config's while the handle is active, rather than being overridden by them).
_SWITCHABLE = ("sdpa", ATTENTION_NAME, REGION_ATTENTION_NAME)


def _configs(model: Any) -> list[Any]:
    """Every config of the model's transformers (sub)models and their sub-configs, once each."""
    found: dict[int, Any] = {}
    pending = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                pending.append(sub)
    return list(found.values())


def check_model_arguments(kwargs: dict[str, Any]) -> None:
    """Arguments of a transformers model's forward that dilated attention cannot honour (some
    models drop ``output_attentions`` before their attention layers see it)."""
    check_attention_arguments(kwargs)


def _is_attention_module(module: Any) -> bool:
    # What transformers passes as `module` to an attention function: its attention layers.
    return "Attention" in type(module).__name__ and hasattr(module, "config") and (
        hasattr(module, "layer_idx") or hasattr(module, "is_causal")
    )


def use_region_attention(model: Any, specs: dict[str, Any]) -> Callable[[], None]:
    """Switch a transformers model's SDPA attention to ``"dilated_compile_sdpa"`` and give each
    attention layer inside a selected module the spec of its innermost region; return the
    function that undoes both. ValueError for a model whose attention is not SDPA.

    The attention function opens that region itself, inside the layer's call: activation
    checkpointing (``model.gradient_checkpointing_enable()``) recomputes the layer during the
    backward pass, outside the regions the forward opened, and must still see the spec.
    """
    configs = _configs(model)
    switched = [c for c in configs if c._attn_implementation in _SWITCHABLE]
    if not switched:
        implementations = sorted({str(c._attn_implementation) for c in configs})
        raise ValueError(
            f"apply: {type(model).__name__} uses attn_implementation={', '.join(implementations)}, "
            "which does not call F.scaled_dot_product_attention, so nothing could be dilated. "
            "Load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) "
            "before dilated_compile.apply."
        )
    saved = [(c, c._attn_implementation_internal) for c in switched]
    for config in switched:
        # The internal field: the public setter would recurse into sub-configs, which are
        # switched (or left alone) one by one here.
        config._attn_implementation_internal = REGION_ATTENTION_NAME

    marked = []
    for name, module in model.named_modules():
        spec = innermost_spec(specs, name)
        if spec is not None and _is_attention_module(module):
            module.__dict__[SPEC_ATTRIBUTE] = spec  # not a submodule or parameter: plain attribute
            marked.append(module)

    def restore() -> None:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation
        for module in marked:
            module.__dict__.pop(SPEC_ATTRIBUTE, None)

    return restore
