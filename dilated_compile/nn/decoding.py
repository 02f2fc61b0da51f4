"""Incremental decoding with a bounded cache.

Causal dilated attention is *prefix-consistent*: a query at position ``p`` attends, under config
``(w, r)``, only keys of its own segment ``[floor(p / w) * w, p]`` whose local index shares its
head's offset, whatever the length of the whole sequence (``min(w, N)`` and ``w`` give the same
segments up to ``p``). So a decoder needs to keep only the tokens of the current segment of each
config: the window ``[min_i floor(p / w_i) * w_i, p]``, never more than ``max(segment_lengths)``
tokens, however long the generated sequence.

``dilated_attention_step`` is the exact attention of one new query over that window: with
``c[p, t]`` the number of configs under which ``p`` attends ``t``, the softmax of
``s_pt + log c[p, t]`` over the window — the same count-weighted softmax the fused op computes
(``O(window)`` work per head and step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..spec import DilatedSpec
from ._pattern import head_slices, window_start


class DilatedKVCache:
    """Keys and values of one self-attention layer that later queries can still attend.

    ``append`` adds the keys/values of the next tokens; ``evict`` drops those no later query
    attends (before ``window_start(spec, position)``). Between two calls of a decoding step the
    cache holds fewer than ``capacity = max(segment_lengths)`` tokens.

    Attributes:
        key, value: ``[B, Hkv, L, D]`` / ``[B, Hkv, L, Dv]`` (None while empty), after positions
            were applied.
        start: position of the first cached token.
        position: position of the next token (= number of tokens seen).
    """

    def __init__(self, spec: DilatedSpec) -> None:
        if not isinstance(spec, DilatedSpec):
            raise TypeError(
                f"DilatedKVCache: spec must be a DilatedSpec (the cache keeps the window a causal "
                f"dilated query can reach), got {type(spec).__name__}: {spec!r}"
            )
        if spec.mode not in ("mixture", "head_groups"):
            raise ValueError(f"DilatedKVCache: unknown mode {spec.mode!r}")
        self.spec = spec
        self.key: Tensor | None = None
        self.value: Tensor | None = None
        self.start = 0
        self.position = 0

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    def __repr__(self) -> str:
        return (
            f"DilatedKVCache(tokens={len(self)}, start={self.start}, position={self.position}, "
            f"capacity={self.capacity})"
        )

    @property
    def capacity(self) -> int:
        """The most tokens the cache holds during a step: the largest segment length."""
        return max(self.spec.segment_lengths)

    @property
    def nbytes(self) -> int:
        if self.key is None:
            return 0
        return self.key.numel() * self.key.element_size() + self.value.numel() * self.value.element_size()

    def append(self, key: Tensor, value: Tensor) -> None:
        """Add the keys/values ``[B, Hkv, T, D]`` of positions ``position .. position + T - 1``."""
        if self.key is None:
            self.key, self.value, self.start = key, value, self.position
        else:
            self.key = torch.cat((self.key, key), dim=2)
            self.value = torch.cat((self.value, value), dim=2)
        self.position += key.shape[2]

    def evict(self) -> None:
        """Drop the tokens that no query at ``position`` or later attends."""
        first = window_start(self.spec, self.position)
        drop = first - self.start
        if self.key is not None and drop > 0:
            # A copy, so the storage of the dropped tokens (e.g. a long prompt) is freed.
            self.key = self.key[:, :, drop:].clone()
            self.value = self.value[:, :, drop:].clone()
            self.start = first

    def reset(self) -> None:
        self.key = self.value = None
        self.start = self.position = 0


class LongNetLMCache:
    """The decoding state of a ``LongNetLM``: one ``DilatedKVCache`` per layer.

    Create it with ``LongNetLM.new_cache()`` and pass it to ``LongNetLM.decode``. Its memory is
    bounded by the largest segment length, not by the number of tokens decoded.
    """

    def __init__(self, layers: list[DilatedKVCache]) -> None:
        self.layers = layers

    @property
    def position(self) -> int:
        """Number of tokens decoded so far (the position of the next one)."""
        return self.layers[0].position if self.layers else 0

    @property
    def capacity(self) -> int:
        return max(layer.capacity for layer in self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def __len__(self) -> int:
        """Tokens held (per layer)."""
        return len(self.layers[0]) if self.layers else 0

    def __repr__(self) -> str:
        return (
            f"LongNetLMCache(layers={len(self.layers)}, position={self.position}, "
            f"tokens={len(self)}, capacity={self.capacity}, nbytes={self.nbytes})"
        )

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()


def dilated_attention_step(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    spec: DilatedSpec,
    *,
    position: int,
    start: int,
    scale: float | None = None,
) -> Tensor:
    """Causal dilated attention of the query at ``position`` over a window of keys.

    Args:
        query: ``[B, Hq, 1, D]``, the query of position ``position``.
        key: ``[B, Hkv, L, D]``, the keys of positions ``start .. start + L - 1`` (ending at
            ``position``; ``Hq % Hkv == 0``).
        value: ``[B, Hkv, L, Dv]``.
        spec: the dilated pattern.
        position: the query's position in the sequence.
        start: the position of ``key[:, :, 0]``; ``start <= window_start(spec, position)``
            for an exact result (keys before the window are ignored anyway).
        scale: score scale; ``1/sqrt(D)`` when None.

    Returns:
        ``[B, Hq, 1, Dv]``: row ``position`` of ``dilated_attention(..., is_causal=True)`` on the
        whole sequence, in ``query.dtype`` (0 for a head whose row no config keeps).

    Example::

        >>> spec = DilatedSpec(segment_lengths=(4, 8), dilation_rates=(1, 2))
        >>> q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
        >>> dilated_attention_step(q, k, v, spec, position=12, start=8).shape   # keys 8..12
        torch.Size([1, 2, 1, 16])
    """
    batch, q_heads, num_queries, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if num_queries != 1:
        raise ValueError(
            f"dilated_attention_step: query must hold one position, got shape {tuple(query.shape)}"
        )
    if start + length - 1 != position:
        raise ValueError(
            f"dilated_attention_step: the keys must end at the query's position {position}, got "
            f"{length} keys from position {start}"
        )
    if q_heads % kv_heads:
        raise ValueError(
            f"dilated_attention_step: query heads ({q_heads}) must be a multiple of key heads ({kv_heads})"
        )
    group = q_heads // kv_heads
    # c[h, t]: under how many configs the query attends each cached key, per head.
    t = torch.arange(start, position + 1, device=query.device)
    counts = torch.zeros(q_heads, length, dtype=torch.int64, device=query.device)
    for part in head_slices(spec, q_heads):
        w, r, o = part.segment_length, part.dilation_rate, part.offset
        segment_start = (position // w) * w
        if (position - segment_start) % r != o:
            continue  # the query's row is dilated away for these heads under this config
        keys_on = (t >= segment_start) & ((t - segment_start) % r == o)
        counts[part.heads] += keys_on.to(torch.int64)
    cdtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q = query.to(cdtype).reshape(batch, kv_heads, group, head_dim)
    scores = torch.matmul(q, key.to(cdtype).transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    counts = counts.view(kv_heads, group, length)
    logits = torch.where(counts > 0, scores + counts.clamp_min(1).to(cdtype).log(), float("-inf"))
    out = _attend(logits, value.to(cdtype))  # [B, Hkv, G, Dv]
    return out.reshape(batch, q_heads, 1, value.shape[-1]).to(query.dtype)


def _attend(scores: Tensor, value: Tensor) -> Tensor:
    """Softmax attention of masked scores ``[..., M, L]`` (``-inf`` = no key) over ``value``
    ``[..., L, Dv]``: ``[..., M, Dv]``. A row with no key gives 0 and zero gradients (never NaN)."""
    # Subtracting the (detached) row maximum is exact for the value and the gradient alike.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(weights, value) / denom
