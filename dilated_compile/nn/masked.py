"""``masked_dilated_attention``: the fused op with additive biases, for one sequence.

The op applies a mask on top of the dilated pattern exactly (the Triton kernels on CUDA, the
exact PyTorch implementation elsewhere) and reads it only where the pattern keeps a pair, so a
``[B, 1, 1, N]`` key-padding mask is never expanded to ``N x N``. This wrapper takes the biases
of ``nn.MultiheadAttention``-style code (a ``[B, N]`` key bias and a pair bias broadcastable to
``[B, Hq, N, N]``); the modules themselves pass SDPA-convention masks to ``attend``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed.context import refuse_inside_sequence_parallel
from ..ops import dilated_attention_op
from ..ops._checks import check_attention_inputs
from ..spec import DilatedSpec

_NAME = "masked_dilated_attention"


def masked_dilated_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    spec: DilatedSpec,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    key_bias: Tensor | None = None,
    attn_bias: Tensor | None = None,
) -> Tensor:
    """Dilated attention of ``query`` over ``key``/``value`` of one sequence, with additive biases.

    A convenience wrapper over the fused op: the biases become one float ``attn_mask`` (a
    ``key_bias`` alone stays a ``[B, 1, 1, N]`` view, never ``N x N``). With ``c[p, t]`` the
    count matrix of the spec and ``m[p, t]`` the summed biases,
    ``out_p = sum_t c[p,t] exp(s_pt + m_pt) v_t / sum_t c[p,t] exp(s_pt + m_pt)``.

    Args:
        query: ``[B, Hq, N, D]``.
        key: ``[B, Hkv, N, D]``, ``Hq % Hkv == 0`` (query head ``h`` reads kv head
            ``h // (Hq // Hkv)``).
        value: ``[B, Hkv, N, Dv]``.
        spec: the dilated pattern.
        is_causal: keep only keys at or before the query position (together with the biases).
        scale: score scale, ``1/sqrt(D)`` when None.
        key_bias: ``[B, N]`` float, added to the score of every query with that key (``-inf``
            drops the key: a padding mask).
        attn_bias: float, broadcastable to ``[B, Hq, N, N]`` (dims of size 1 broadcast), added
            to the score of query ``p`` with key ``t``. Only its entries inside the dilated
            pattern are read.

    The biases are applied in float64 for float64 queries, float32 otherwise. They get no
    gradient: a bias that requires grad raises ``NotImplementedError``.

    Returns:
        ``[B, Hq, N, Dv]`` in ``query.dtype``; a row that attends no key gives 0.

    For a bool mask (True = keep), or queries that are the last positions of a longer key
    sequence, call ``dilated_compile.dilated_attention(..., attn_mask=...)`` instead.

    Example::

        >>> spec = DilatedSpec(segment_lengths=(8, 16), dilation_rates=(1, 2))
        >>> q = k = v = torch.randn(2, 4, 20, 16)
        >>> padding = torch.zeros(2, 20)
        >>> padding[1, 15:] = float("-inf")                 # the second sequence has 15 tokens
        >>> masked_dilated_attention(q, k, v, spec, key_bias=padding).shape
        torch.Size([2, 4, 20, 16])
    """
    refuse_inside_sequence_parallel("masked_dilated_attention")
    _check_one_sequence(query, key)
    check_attention_inputs(query, key, value)
    _check_biases(query, key_bias, attn_bias)
    mask = _biases_as_mask(query, key_bias, attn_bias)
    # The op itself rather than annotated SDPA: this function runs under any torch.compile
    # backend, and the op takes is_causal together with a mask.
    out, _ = dilated_attention_op(
        query, key, value, list(spec.segment_lengths), list(spec.dilation_rates), spec.mode,
        bool(is_causal), None if scale is None else float(scale), mask,
    )
    return out


def _check_one_sequence(query: Tensor, key: Tensor) -> None:
    """The biases are indexed by positions of one sequence: the keys must be the queries'."""
    shaped = all(isinstance(t, Tensor) and t.dim() == 4 for t in (query, key))
    if shaped and key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{_NAME}: key and value must have the query's length (one sequence length N = "
            f"{query.shape[2]}), got key seq_len {key.shape[2]}; for queries that are the last "
            "positions of a longer key sequence (a KV cache) call "
            "dilated_compile.dilated_attention(query, key, value, spec, attn_mask=...)"
        )


def _check_biases(query: Tensor, key_bias: Tensor | None, attn_bias: Tensor | None) -> None:
    """``key_bias`` ``[B, N]`` and ``attn_bias`` broadcastable to ``[B, Hq, N, N]``, both float."""
    batch, q_heads, seq_len, _ = query.shape
    for name, bias in (("key_bias", key_bias), ("attn_bias", attn_bias)):
        if bias is not None and not bias.is_floating_point():
            raise TypeError(
                f"{_NAME}: {name} must be floating point (added to the scores; -inf drops a pair), "
                f"got {bias.dtype}; for a bool mask (True = keep) call "
                "dilated_compile.dilated_attention(..., attn_mask=mask)"
            )
    if key_bias is not None and tuple(key_bias.shape) != (batch, seq_len):
        raise ValueError(
            f"{_NAME}: key_bias must have shape [B, N] = [{batch}, {seq_len}], got "
            f"{tuple(key_bias.shape)}"
        )
    full = (batch, q_heads, seq_len, seq_len)
    if attn_bias is not None and (
        attn_bias.dim() > 4
        or any(a not in (1, f) for a, f in zip(reversed(attn_bias.shape), reversed(full)))
    ):
        raise ValueError(
            f"{_NAME}: attn_bias must broadcast to [B, Hq, N, N] = {list(full)}, got "
            f"{tuple(attn_bias.shape)}"
        )


def _biases_as_mask(query: Tensor, key_bias: Tensor | None, attn_bias: Tensor | None) -> Tensor | None:
    """The biases summed into one float mask broadcastable to ``[B, Hq, N, N]``, or None.

    ``key_bias`` ``[B, N]`` becomes the view ``[B, 1, 1, N]``: added to an ``attn_bias`` it
    broadcasts to the shape of their sum, alone it is never expanded."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    key_mask = None if key_bias is None else key_bias.to(dtype)[:, None, None, :]
    pair_mask = None if attn_bias is None else attn_bias.to(dtype)
    if key_mask is None or pair_mask is None:
        return key_mask if pair_mask is None else pair_mask
    return key_mask + pair_mask
