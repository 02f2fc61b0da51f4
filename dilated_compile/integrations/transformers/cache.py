"""``DilatedCache``: a transformers ``Cache`` that keeps only the keys a later query can attend.

Causal dilated attention is prefix-consistent (see ``dilated_compile.nn.decoding``): under config
``(w, r)`` the query at position ``p`` attends only keys of its own segment
``[floor(p / w) * w, p]``. The dilated op places the keys it is given at positions ``0 .. Nk - 1``
(the queries at the last ones), so the keys handed to it may start only at a position that is a
multiple of every segment length, or the segments would move. With ``L`` the least common
multiple of the segment lengths (the largest one when each divides it, as in LongNet's configs),
each layer keeps the keys from ``floor(p / L) * L`` on, ``p`` the position of the next token: the
pattern of that window is exactly the pattern of the whole sequence for the new queries.

Memory per layer: at most ``L - 1`` tokens between forwards, and ``L - 1 + n`` during a forward of
``n`` new tokens (the prompt's forward holds the whole prompt once, as any cache does).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ...apply_specs import innermost_spec
from ...spec import DilatedSpec
from .config import CONFIG_FIELD, spec_from_config

__all__ = ["DilatedCache", "DilatedLayer"]


class DilatedLayer(DynamicLayer):
    """One layer's keys and values from position ``start = floor(seen / period) * period``.

    ``get_seq_length()`` is the number of tokens seen (not held), as for transformers' sliding
    layers, so positions and padding masks keep counting from the start of the sequence;
    ``get_mask_sizes`` tells the mask builder that the keys start at ``start``.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False  # evicted keys cannot come back

    def __init__(self, period: int, **kwargs: Any) -> None:
        super().__init__()
        self.period = int(period)
        self.cumulative_length = 0
        self.start = 0

    def __repr__(self) -> str:
        return (
            f"DilatedLayer(period={self.period}, seen={self.cumulative_length}, start={self.start}, "
            f"held={self.num_held})"
        )

    @property
    def num_held(self) -> int:
        """Tokens held now."""
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys/values; return those of positions ``start ..`` the last new
        token (what the attention gets), then drop the ones no later query attends."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        first = (self.cumulative_length // self.period) * self.period
        drop = first - self.start
        if drop > 0:
            # A copy, so the storage of the dropped tokens (a long prompt) is freed now.
            self.keys = keys[:, :, drop:].clone()
            self.values = values[:, :, drop:].clone()
            self.start = first
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the keys the next ``update`` returns."""
        return self.cumulative_length - self.start + query_length, self.start

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.start = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens, while none of the kept ones is needed
        from before ``start``."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"DilatedLayer.crop takes a negative number of tokens to remove, got {tokens_to_remove}"
            )
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        seen = self.cumulative_length - n
        if seen < self.start:
            raise RuntimeError(
                f"cannot crop {n} tokens: the DilatedCache dropped the tokens before position "
                f"{self.start} and would need them again (it keeps {self.num_held} of "
                f"{self.cumulative_length})"
            )
        self.keys = self.keys[..., : self.keys.shape[-2] - n, :]
        self.values = self.values[..., : self.values.shape[-2] - n, :]
        self.cumulative_length = seen


def _specs_of(source: Any) -> list[DilatedSpec]:
    if isinstance(source, DilatedSpec):
        return [source]
    if hasattr(source, CONFIG_FIELD) or hasattr(source, "to_dict"):  # a transformers config
        return [spec_from_config(source)]
    specs = getattr(source, "specs", None)  # an apply handle
    if isinstance(specs, dict):
        others = [spec for spec in specs.values() if not isinstance(spec, DilatedSpec)]
        if others:
            raise TypeError(
                f"DilatedCache bounds the keys of dilated attention only; this handle also applies "
                f"{others[0]!r}"
            )
        return list(specs.values())
    if isinstance(source, Iterable):
        return [s for item in source for s in _specs_of(item)]
    raise TypeError(
        "DilatedCache takes a DilatedSpec, a transformers config with config.dilated_attention, "
        f"the handle dilated_compile.apply returned, or a sequence of those; got {source!r}"
    )


def _check_every_layer_has_a_spec(handle: Any) -> None:
    """A bounded cache drops keys a dense layer still attends: refuse a handle that leaves
    attention layers outside every region."""
    from . import _is_attention_module  # the package's notion of an attention layer

    dense = [
        name for name, module in handle.model.named_modules()
        if _is_attention_module(module) and innermost_spec(handle.specs, name) is None
    ]
    if dense:
        raise ValueError(
            f"DilatedCache: the attention layers {', '.join(dense[:4])}{', ...' if len(dense) > 4 else ''} "
            "are outside every region of this apply handle, so they attend densely and need all "
            "their keys; select every attention layer, or use the default cache"
        )


def _check_no_sliding_layers(config: Any) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    local = sorted({t for t in layer_types if t != "full_attention"})
    if local or (getattr(text, "sliding_window", None) is not None and not layer_types):
        raise ValueError(
            f"DilatedCache: this config has sliding-window or chunked layers ({local or 'sliding_window'}), "
            "which it does not support; set sliding_window=None (or use_sliding_window=False)"
        )


class DilatedCache(Cache):
    """A transformers cache for dilated attention whose memory does not grow with the sequence.

    Args:
        spec_or_config: the pattern the model attends with: a ``DilatedSpec``, a transformers
            config whose ``dilated_attention`` field holds it (``attn_implementation=
            "dilated_compile"``), the handle ``dilated_compile.apply`` returned, or a sequence of
            specs (one per layer: the window fits all of them).
        offloading: as for ``DynamicCache``.

    Every layer keeps the keys/values from position ``floor(p / L) * L`` on, ``p`` the position
    of the next token and ``L = period`` the least common multiple of all segment lengths: at
    most ``L - 1`` tokens per layer between forwards (``L - 1 + n`` during a forward of ``n``
    tokens). Generation with it equals generation with the full cache, token for token.

    Requirements: every attention layer of the model attends causally with one of the given
    specs (a dense layer would need all its keys), the model has no sliding-window layers, and
    the attention is this library's (``dilated_compile.apply`` or
    ``attn_implementation="dilated_compile"``).

    Example::

        >>> cache = DilatedCache(spec)
        >>> # past_key_values=cache (cache=cache on releases that renamed the argument)
        >>> out = model.generate(ids, max_new_tokens=100_000, past_key_values=cache)
        >>> cache.layers[0].num_held <= cache.period
        True
    """

    def __init__(self, spec_or_config: Any, *, offloading: bool = False) -> None:
        specs = _specs_of(spec_or_config)
        if not specs:
            raise ValueError("DilatedCache: no spec given")
        if not isinstance(spec_or_config, DilatedSpec) and hasattr(spec_or_config, "to_dict"):
            _check_no_sliding_layers(spec_or_config)
        if isinstance(getattr(spec_or_config, "specs", None), dict) and hasattr(spec_or_config, "model"):
            _check_every_layer_has_a_spec(spec_or_config)
            if hasattr(spec_or_config.model, "config"):
                _check_no_sliding_layers(spec_or_config.model.config)
        self.specs = tuple(dict.fromkeys(specs))
        self.period = math.lcm(*(w for spec in self.specs for w in spec.segment_lengths))
        # Cache calls it (no arguments) to add a layer the first time a layer index is updated.
        new_layer = functools.partial(DilatedLayer, self.period)
        super().__init__(layer_class_to_replicate=new_layer, offloading=offloading)

    def __repr__(self) -> str:
        held = self.layers[0].num_held if self.layers else 0
        seen = self.get_seq_length()
        return (
            f"DilatedCache(period={self.period}, layers={len(self.layers)}, seen={seen}, "
            f"held per layer={held})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values of all layers."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total
