"""Dilated attention with additive masks, in plain PyTorch: how the modules honour
``key_padding_mask`` and ``attn_mask`` exactly.

The fused op defines its own sparsity and takes no mask. A mask restricts the dilated pattern
further, so the masked result is, with ``c[p, t]`` the count matrix of the spec and ``m[p, t]``
the additive mask (``-inf`` where a boolean mask forbids the pair),

    out_p = sum_t c[p,t] exp(s_pt + m_pt) v_t / sum_t c[p,t] exp(s_pt + m_pt),

computed here the way the op computes the unmasked one: for each config and head offset,
dense attention over the dilated rows of every segment (a strided view of the inputs, cost
``O(N * w / r)`` per head, never an ``N x N`` score tensor), merged across configs by
log-sum-exp. Everything is out-of-place PyTorch, so autograd and ``torch.compile`` (any backend)
differentiate and trace it as they are. A row that attends no key gives 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops._checks import check_attention_inputs
from ..spec import DilatedSpec
from ._pattern import head_slices

_NEG_INF = float("-inf")


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
    """Dilated attention of ``query`` over ``key``/``value`` with additive masks.

    Args:
        query: ``[B, Hq, N, D]``.
        key: ``[B, Hkv, N, D]``, ``Hq % Hkv == 0`` (query head ``h`` reads kv head
            ``h // (Hq // Hkv)``).
        value: ``[B, Hkv, N, Dv]``.
        spec: the dilated pattern.
        is_causal: keep only keys at or before the query position.
        scale: score scale, ``1/sqrt(D)`` when None.
        key_bias: ``[B, N]`` float, added to the score of every query with that key (``-inf``
            drops the key: a padding mask).
        attn_bias: float, broadcastable to ``[B, Hq, N, N]`` (dims of size 1 broadcast), added
            to the score of query ``p`` with key ``t``. Only its entries inside the dilated
            pattern matter.

    Returns:
        ``[B, Hq, N, Dv]`` in ``query.dtype`` (computed in float32, float64 for float64).

    With no bias this equals ``dilated_attention`` (to rounding); use the fused op then, it
    is faster and lighter.

    Example::

        >>> spec = DilatedSpec(segment_lengths=(8, 16), dilation_rates=(1, 2))
        >>> q = k = v = torch.randn(2, 4, 20, 16)
        >>> padding = torch.zeros(2, 20)
        >>> padding[1, 15:] = float("-inf")                 # the second sequence has 15 tokens
        >>> masked_dilated_attention(q, k, v, spec, key_bias=padding).shape
        torch.Size([2, 4, 20, 16])
    """
    check_attention_inputs(query, key, value)
    batch, q_heads, seq_len, head_dim = query.shape
    if key_bias is not None and tuple(key_bias.shape) != (batch, seq_len):
        raise ValueError(
            f"masked_dilated_attention: key_bias must have shape [B, N] = [{batch}, {seq_len}], got "
            f"{tuple(key_bias.shape)}"
        )
    full = (batch, q_heads, seq_len, seq_len)
    if attn_bias is not None and (
        attn_bias.dim() > 4
        or any(a not in (1, f) for a, f in zip(reversed(attn_bias.shape), reversed(full)))
    ):
        raise ValueError(
            f"masked_dilated_attention: attn_bias must broadcast to [B, Hq, N, N] = {list(full)}, got "
            f"{tuple(attn_bias.shape)}"
        )
    kv_heads = key.shape[1]
    if kv_heads != q_heads:
        key = key.repeat_interleave(q_heads // kv_heads, dim=1)
        value = value.repeat_interleave(q_heads // kv_heads, dim=1)
    cdtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q, k, v = query.to(cdtype) * scale, key.to(cdtype), value.to(cdtype)
    if key_bias is not None:
        key_bias = key_bias.to(cdtype)
    if attn_bias is not None:
        attn_bias = attn_bias.to(cdtype)
        while attn_bias.dim() < 4:
            attn_bias = attn_bias.unsqueeze(0)
    if seq_len == 0:
        return query.new_zeros(batch, q_heads, 0, value.shape[-1]) + 0.0 * query.sum()

    slices = head_slices(spec, q_heads)
    outs, lses = [], []
    for config, (segment_length, _) in enumerate(spec.configs):
        w = min(segment_length, seq_len)
        segments = -(-seq_len // w)
        pad = segments * w - seq_len

        def split(x: Tensor) -> Tensor:  # [B, H, N, E] -> [B, H, S, w, E], zero-padded
            return F.pad(x, (0, 0, 0, pad)).unflatten(2, (segments, w))

        qs, ks, vs = split(q), split(k), split(v)
        key_valid = (torch.arange(segments * w, device=q.device) < seq_len).view(segments, w)
        kb = None if key_bias is None else F.pad(key_bias, (0, pad)).view(batch, segments, w)
        ab = None if attn_bias is None else _diagonal_blocks(attn_bias, segments, w, pad)
        out = q.new_zeros(batch, q_heads, segments, w, v.shape[-1])
        lse = q.new_full((batch, q_heads, segments, w), _NEG_INF)
        for part in slices:
            if part.config != config or part.offset >= w:
                continue  # another config's heads, or an offset with no row in a segment
            rows, heads = slice(part.offset, None, part.dilation_rate), part.heads
            scores = torch.matmul(qs[:, heads, :, rows], ks[:, heads, :, rows].transpose(-1, -2))
            allowed = key_valid[:, rows].unsqueeze(-2)  # [S, 1, m]: keys past N are padding
            if is_causal:
                # Rows of one offset keep their order, so position order is row order.
                m = scores.shape[-1]
                allowed = allowed & torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
            if kb is not None:
                scores = scores + kb[:, None, :, None, rows]
            if ab is not None:
                ab_heads = heads if ab.shape[1] > 1 else slice(None)
                scores = scores + ab[:, ab_heads, :, rows, rows]
            scores = torch.where(allowed, scores, _NEG_INF)
            part_out, part_lse = _attend(scores, vs[:, heads, :, rows])
            out[:, heads, :, rows] = part_out
            lse[:, heads, :, rows] = part_lse
        outs.append(out.flatten(2, 3)[:, :, :seq_len])
        lses.append(lse.flatten(2, 3)[:, :, :seq_len])
    return _merge(outs, lses).to(query.dtype)


def _diagonal_blocks(bias: Tensor, segments: int, w: int, pad: int) -> Tensor:
    """The ``w x w`` diagonal blocks of a ``[b, h, N, N]`` bias: ``[b, h, S, w, w]``."""
    padded = F.pad(bias, (0, pad, 0, pad))
    blocks = padded.unflatten(-1, (segments, w)).unflatten(-3, (segments, w))  # [b,h,S,w,S,w]
    return torch.diagonal(blocks, dim1=2, dim2=4).permute(0, 1, 4, 2, 3)


def _attend(scores: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention of masked scores (``-inf`` = no key): output and log-sum-exp per row.
    A row with no key gives output 0, lse ``-inf`` and zero gradients (never NaN)."""
    # Subtracting the (detached) row maximum is exact for the value and the gradient alike.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    denom = torch.where(nonempty, denom, torch.ones_like(denom))
    out = torch.matmul(weights, value) / denom
    lse = torch.where(nonempty, denom.log() + row_max, _NEG_INF).squeeze(-1)
    return out, lse


def _merge(outs: list[Tensor], lses: list[Tensor]) -> Tensor:
    """LongNet's merge: the configs' outputs weighted by their softmax denominators."""
    lse = torch.stack(lses)  # [C, B, H, N]
    top = lse.amax(dim=0, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse - top)
    denom = weights.sum(dim=0)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return (weights.unsqueeze(-1) * torch.stack(outs)).sum(dim=0) / denom.unsqueeze(-1)
