"""The dilated pattern saved in a transformers config: ``config.dilated_attention``.

A plain dict, so it is written by ``save_pretrained`` and read back by ``from_pretrained``::

    config.dilated_attention = {"segment_lengths": [2048, 4096], "dilation_rates": [1, 2],
                                "mode": "mixture"}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...spec import DilatedSpec

CONFIG_FIELD = "dilated_attention"

_EXAMPLE = (
    '{"segment_lengths": [2048, 4096], "dilation_rates": [1, 2], "mode": "mixture"}'
)


def set_config_spec(config: Any, spec: DilatedSpec) -> None:
    """Write ``spec`` into ``config.dilated_attention`` (a JSON-serialisable dict).

    Example::

        >>> config = LlamaConfig(...)
        >>> set_config_spec(config, DilatedSpec((2048, 4096), (1, 2)))
        >>> model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated_compile")
    """
    if not isinstance(spec, DilatedSpec):
        raise TypeError(f"set_config_spec: spec must be a DilatedSpec, got {type(spec).__name__}")
    setattr(config, CONFIG_FIELD, {
        "segment_lengths": list(spec.segment_lengths),
        "dilation_rates": list(spec.dilation_rates),
        "mode": spec.mode,
    })


def spec_from_config(config: Any) -> DilatedSpec:
    """The ``DilatedSpec`` in ``config.dilated_attention``; ValueError when it is missing.

    Under ``torch.compile`` this runs inside the traced attention call: the dict's values are
    constants of the graph, and ``DilatedSpec`` is built from them as a region opened in
    compiled code is.
    """
    value = getattr(config, CONFIG_FIELD, None)
    if value is None:
        raise ValueError(
            f'attn_implementation="dilated_compile" reads the pattern from config.{CONFIG_FIELD}, '
            f"which {type(config).__name__} does not set. Set it before creating the model, e.g. "
            f"config.{CONFIG_FIELD} = {_EXAMPLE} (or set_config_spec(config, spec)), or use "
            "dilated_compile.apply(model, spec) on an attn_implementation='sdpa' model."
        )
    if isinstance(value, DilatedSpec):
        raise TypeError(
            f"config.{CONFIG_FIELD} must be a dict (it is saved as JSON with the config), got a "
            f"DilatedSpec; use set_config_spec(config, spec)"
        )
    if not isinstance(value, Mapping):
        raise TypeError(
            f"config.{CONFIG_FIELD} must be a dict like {_EXAMPLE}, got {type(value).__name__}: "
            f"{value!r}"
        )
    unknown = set(value) - {"segment_lengths", "dilation_rates", "mode"}
    if unknown or "segment_lengths" not in value or "dilation_rates" not in value:
        raise ValueError(
            f"config.{CONFIG_FIELD} must hold segment_lengths, dilation_rates and optionally "
            f"mode, like {_EXAMPLE}; got {dict(value)!r}"
        )
    return DilatedSpec(
        tuple(value["segment_lengths"]), tuple(value["dilation_rates"]), value.get("mode", "mixture")
    )
