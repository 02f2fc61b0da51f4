"""Argument checks shared by the public entry points and the ops.

Errors name the argument, its value and the fix; they are raised once, at the boundary where
data comes in (the functional, the annotation, the op when called through ``torch.ops``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..spec import DilatedSpec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def static_int(value):
    """``value`` as a Python int when it is a ``torch.SymInt`` (else unchanged).

    ``torch.compile(..., dynamic=True)`` hands an op the ints it reads from closures and globals
    as symbols. A pattern's numbers fix the kernels' structure (tile walks, constexprs), so they
    are specialised here: ``int()`` guards the compiled graph on the value, which a pattern keeps
    from call to call, so nothing recompiles."""
    return int(value) if isinstance(value, torch.SymInt) else value


def static_ints(values: Sequence[int]) -> list[int]:
    """``static_int`` of each of ``values`` (segment lengths, dilation rates)."""
    return [static_int(x) for x in values]


def check_pattern(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str
) -> DilatedSpec:
    """Validate raw op arguments the way ``DilatedSpec`` does (ops can be called directly)."""
    return DilatedSpec(tuple(segment_lengths), tuple(dilation_rates), mode)


def check_attention_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    enable_gqa: bool = True,
) -> None:
    """Check SDPA-layout inputs: query [B, Hq, Nq, D], key [B, Hkv, Nk, D], value [B, Hkv, Nk, Dv].

    Dilated attention relates positions of one sequence: the keys are its positions
    ``0 .. Nk - 1`` and the queries its last ``Nq <= Nk`` positions (the KV-cache convention),
    so a query longer than the keys is refused.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, heads, seq_len, head_dim] (the SDPA layout), got "
                f"shape {tuple(t.shape)}; a [batch, seq_len, heads, head_dim] tensor needs "
                ".transpose(1, 2)"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            "query, key and value must be on one device, got "
            f"{query.device}, {key.device}, {value.device}"
        )
    batch, q_heads, seq_len, head_dim = query.shape
    _, kv_heads, kv_len, key_dim = key.shape
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            "key and value must agree in [batch, heads, seq_len], got key "
            f"{tuple(key.shape)} and value {tuple(value.shape)}"
        )
    if key.shape[0] != batch:
        raise ValueError(
            f"query and key must share the batch size, got query {tuple(query.shape)} and "
            f"key {tuple(key.shape)}"
        )
    if seq_len > kv_len:
        raise ValueError(
            "dilated attention needs query seq_len <= key seq_len (queries are the last positions "
            f"of the key sequence, as with a KV cache), got query seq_len {seq_len} and key "
            f"seq_len {kv_len}"
        )
    if key_dim != head_dim:
        raise ValueError(
            f"query and key must share head_dim, got query {tuple(query.shape)} and key "
            f"{tuple(key.shape)}"
        )
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"the number of query heads ({q_heads}) must be a multiple of the number of key/value "
            f"heads ({kv_heads})"
        )
    if q_heads != kv_heads and not enable_gqa:
        raise ValueError(
            f"query has {q_heads} heads and key/value {kv_heads}: pass enable_gqa=True for "
            "grouped-query attention"
        )


def check_attn_mask(attn_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> None:
    """Check ``attn_mask`` as SDPA takes it: bool (True = keep) or float (added to the scores) of
    the query's dtype or float32, broadcastable to ``[B, Hq, Nq, Nk]``, on the query's device."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    allowed = {torch.bool, query.dtype, torch.float32}
    if attn_mask.dtype not in allowed:
        raise TypeError(
            f"attn_mask must be bool (True = keep) or float ({query.dtype} or float32, added to "
            f"the scores), got {attn_mask.dtype}"
        )
    full = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if attn_mask.dim() > 4 or any(
        m != 1 and m != f for m, f in zip(reversed(attn_mask.shape), reversed(full))
    ):
        raise ValueError(
            f"attn_mask must broadcast to [B, Hq, Nq, Nk] = {list(full)}, got shape "
            f"{tuple(attn_mask.shape)}"
        )
    if attn_mask.device != query.device:
        raise ValueError(
            f"attn_mask must be on the query's device {query.device}, got {attn_mask.device}"
        )


def check_sdpa_mask_and_causal(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    """SDPA refuses ``attn_mask`` together with ``is_causal=True``; so do the SDPA-shaped entry
    points (the annotation, the functional). The ops themselves take both: the intersection."""
    if attn_mask is not None and is_causal:
        raise ValueError(
            "attn_mask and is_causal=True were both given: fold the causal mask into attn_mask "
            "(e.g. attn_mask & torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)) or pass only "
            "is_causal=True"
        )


def check_attn_mask_grad(attn_mask: torch.Tensor | None) -> None:
    """Refuse a float mask that requires grad: the ops give no gradient for it."""
    if attn_mask is not None and attn_mask.requires_grad:
        raise NotImplementedError(
            "gradients with respect to attn_mask are not supported by dilated attention: pass "
            "attn_mask.detach() (a learned bias needs a score_mod-style op, not a mask)"
        )


def expand_attn_mask(
    attn_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor | None:
    """``attn_mask`` as a 4-D view ``[B, Hq, Nq, Nk]``: broadcast dims get stride 0, nothing is
    copied (a key-padding mask ``[B, 1, 1, Nk]`` stays ``B * Nk`` elements)."""
    if attn_mask is None:
        return None
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


def check_op_args(q, k, v, segment_lengths, dilation_rates, mode, attn_mask=None) -> None:
    """Everything the dilated ops check when called directly through ``torch.ops``."""
    check_attention_inputs(q, k, v)
    check_pattern(segment_lengths, dilation_rates, mode).check_num_heads(q.shape[1])
    check_attn_mask(attn_mask, q, k)
