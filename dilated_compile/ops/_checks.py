"""Argument checks shared by the public entry points and the ops.

Errors name the argument, its value and the fix; they are raised once, at the boundary where
data comes in (the functional, the annotation, the op when called through ``torch.ops``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..spec import DilatedSpec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """Check SDPA-layout inputs: query [B, Hq, N, D], key [B, Hkv, N, D], value [B, Hkv, N, Dv].

    Dilated attention relates positions of one sequence, so query and key/value must share
    the sequence length N (no cross-attention between different lengths).
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
    if kv_len != seq_len:
        raise ValueError(
            "dilated attention needs query and key/value of one sequence length (segments are "
            f"positions of one sequence), got query seq_len {seq_len} and key seq_len {kv_len}"
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


def check_op_args(q, k, v, segment_lengths, dilation_rates, mode) -> None:
    """Everything the dilated ops check when called directly through ``torch.ops``."""
    check_attention_inputs(q, k, v)
    check_pattern(segment_lengths, dilation_rates, mode).check_num_heads(q.shape[1])
