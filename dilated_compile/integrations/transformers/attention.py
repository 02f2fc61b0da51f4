"""Attention functions for transformers' ``AttentionInterface`` (and their mask function).

transformers' own ``sdpa_attention_forward`` either repeats the key/value heads or, for one new
token, packs the grouped query heads into the query length (``pack_gqa``): the second would put
the heads at made-up positions and silently change a position-dependent pattern. These functions
call ``F.scaled_dot_product_attention`` once with the real heads (``enable_gqa``: the dilated op
does grouped-query attention natively), the mask transformers built, and the queries as the last
positions of the keys — the KV-cache convention of the dilated op.

- ``region_attention_forward`` (name ``"dilated_compile_sdpa"``): plain SDPA; inside a
  ``dilated(...)`` region (opened by ``dilated_compile.apply`` or by the user) it is dilated,
  outside it is dense.
- ``config_attention_forward`` (name ``"dilated_compile"``): the same call inside
  ``dilated(spec)`` with the spec read from ``config.dilated_attention``.

Both check what the dilated op cannot honour and raise instead of computing something else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.masking_utils import sdpa_mask

from ...annotation import dilated
from ...apply_specs import region_factory
from .config import spec_from_config

ATTENTION_NAME = "dilated_compile"
REGION_ATTENTION_NAME = "dilated_compile_sdpa"
# Set by dilated_compile.apply on the attention layers it selected: the spec of their region.
SPEC_ATTRIBUTE = "_dilated_compile_spec"

# Attention arguments some transformers models pass that SDPA (and so the dilated op) has no
# counterpart for; transformers' SDPA wrapper rejects or folds them, here they raise.
_UNSUPPORTED = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}


def check_attention_arguments(kwargs: dict[str, Any]) -> None:
    """Raise for attention arguments dilated attention cannot honour (instead of ignoring them)."""
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            "output_attentions=True: dilated attention never forms the attention matrix. Call the "
            "model without output_attentions, or use an attn_implementation='eager' copy of it "
            "(dense) to look at attention weights."
        )
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"this model passes {name}= ({what}) to its attention, which dilated attention "
                "does not support"
            )
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(
            "this model adds a position_bias to its attention scores (T5-style relative "
            "positions), which dilated attention does not support"
        )


def region_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One attention call of a transformers model as a single SDPA call (inside the region of
    ``module._dilated_compile_spec`` when ``dilated_compile.apply`` set one).

    Args:
        module: the attention module (for ``is_causal``).
        query: ``[B, Hq, Nq, D]``; key ``[B, Hkv, Nk, D]``; value ``[B, Hkv, Nk, Dv]``, with
            ``Nq <= Nk`` (a cache) and the queries the last ``Nq`` positions.
        attention_mask: ``[B, 1, Nq, Nk]`` bool (True = keep) or float, or None.
        dropout, scaling, is_causal: as transformers passes them.

    Returns:
        ``([B, Nq, Hq, Dv], None)``, transformers' layout (no attention weights).
    """
    spec = getattr(module, SPEC_ATTRIBUTE, None)
    if spec is not None:
        with region_factory(spec)():
            return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    check_attention_arguments(kwargs)
    q_length, kv_length = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers does: one query (decoding) sees every cached key; a mask replaces is_causal.
    # The shape comes first, so that a symbolic length gives a plain bool under torch.compile.
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and kv_length > q_length:
        # Only a cache that hands out keys past the tokens seen (a StaticCache prefill) gets here.
        raise ValueError(
            f"causal attention of {q_length} queries over {kv_length} keys without a mask: the "
            "keys run past the queries, as a StaticCache's preallocated keys do. Dilated "
            "attention places the queries at the last key positions, so it needs a cache that "
            "returns only the tokens seen: use the default DynamicCache or DilatedCache (not "
            "cache_implementation='static')."
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=bool(is_causal),
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def config_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``region_attention_forward`` inside ``dilated(spec)``, spec from ``config.dilated_attention``."""
    spec = spec_from_config(module.config)
    with dilated(spec):
        return _attention(
            module, query, key, value, attention_mask, kwargs.pop("dropout", 0.0),
            kwargs.pop("scaling", None), kwargs.pop("is_causal", None), kwargs,
        )


def dilated_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' ``sdpa_mask`` (bool, ``[B, 1, Nq, Nk]`` or None), after checking that the
    cache hands the attention keys it can place.

    The dilated op places key ``j`` at position ``j`` of its pattern and the queries at the last
    positions. That is exact when the keys start at position 0 (the default cache), or at a
    multiple of every segment length (``DilatedCache``), and end at the last query. A static
    cache (keys preallocated past the tokens seen) and a sliding-window cache (keys starting
    anywhere) break it; they raise here.
    """
    if isinstance(q_offset, torch.Tensor):
        raise ValueError(
            "this cache tracks its length in a tensor, as transformers' StaticCache does: its "
            "keys are preallocated to the maximum length, and dilated attention would place the "
            "queries at the end of that buffer. Use the default DynamicCache or DilatedCache "
            "(not cache_implementation='static' or a StaticCache)."
        )
    if attention_mask is not None and attention_mask.dim() == 2 and (
        attention_mask.shape[-1] < kv_offset + kv_length
    ):
        raise ValueError(
            f"the cache hands the attention {kv_length} keys from position {kv_offset} but only "
            f"{attention_mask.shape[-1]} tokens were seen: it preallocates keys (a StaticCache?). "
            "Dilated attention needs the keys to end at the last query: use the default "
            "DynamicCache or DilatedCache."
        )
    if local_size is not None and kv_offset != 0:
        raise ValueError(
            f"a sliding-window (or chunked) attention layer's cache dropped the keys before "
            f"position {kv_offset}; dilated attention would then place the remaining keys at the "
            "wrong positions of its pattern. Sliding-window layers are not supported with a cache "
            "past their window: disable the window in the config (sliding_window=None, or "
            "use_sliding_window=False), or keep prompt + generation shorter than the window."
        )
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size, **kwargs,
    )
