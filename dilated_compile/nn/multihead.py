"""``MultiheadDilatedAttention``: a drop-in for ``nn.MultiheadAttention`` computing dilated (or
block-sparse) attention, with MAGNETO's Sub-LN and initialisation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.context import sequence_parallel_is_open
from ..distributed.positions import context_positions
from ..spec import DilatedSpec
from ._checks import (
    check_attention_dropout,
    check_bounded_decoding,
    check_positive_int,
    check_probability,
    resolve_attention_spec,
)
from .attention import attend
from .decoding import DilatedKVCache, dilated_attention_step

_NAME = "MultiheadDilatedAttention"


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated (or block-sparse) attention, shaped like ``nn.MultiheadAttention``.

    ``out = out_proj(LN(attention(q_proj(query), k_proj(key), v_proj(value))))``: the heads are
    projected, attend with dilated attention (LongNet, Ding et al. 2023) or the block-sparse
    pattern of a ``BlockSparseSpec``, are concatenated, normalised (Sub-LN, MAGNETO;
    ``layer_norm=False`` drops it, giving exactly the layout of ``nn.MultiheadAttention``) and
    projected out.

    Args:
        embed_dim: ``E``, a multiple of ``num_heads``; head dim ``D = E // num_heads``.
        num_heads: query heads ``H``.
        segment_lengths, dilation_rates, mode: the dilated pattern (``DilatedSpec``); or give
            ``spec`` instead.
        dropout: attention dropout. Must be 0 in training mode (``NotImplementedError``
            otherwise: sparse attention never forms the attention weights); honoured (as the
            identity) in eval mode.
        bias: biases of the four projections.
        batch_first: ``[B, N, E]`` inputs (True, the default here) or ``[N, B, E]`` (False).
        layer_norm: the Sub-LN ``LayerNorm(E)`` before ``out_proj``.
        gamma_init: MAGNETO's ``gamma``: ``v_proj`` and ``out_proj`` are initialised
            ``xavier_normal_(gain=gamma_init)``, ``q_proj``/``k_proj`` with gain 1, biases 0.
        num_kv_heads: key/value heads (grouped-query attention); ``num_heads`` when None.
        device, dtype: of the parameters.
        layer_norm_eps: epsilon of the Sub-LN.
        position_embedding: optional module ``(q, k, positions) -> (q, k)`` applied to the
            ``[B, H, N, D]`` heads (``RotaryEmbedding``, ``XPos``). Inside
            ``sequence_parallel(...)`` the inputs are this rank's shard of the sequence and the
            positions its global ones (``sequence_positions``); the masks and ``forward_cached``
            raise there.
        spec: the pattern as a spec, instead of ``segment_lengths``/``dilation_rates``/``mode``
            (exactly one of the two ways; ``TypeError`` otherwise): a ``DilatedSpec``, or a
            ``BlockSparseSpec`` for block-sparse attention (BigBird / Longformer blocks). An
            explicit block layout becomes a non-persistent buffer ``pattern_layout``, so it
            follows ``.to(device)``. Bounded-cache decoding (``forward_cached``) is for a
            ``DilatedSpec`` only.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, None)``, with ``nn.MultiheadAttention``'s
    shapes and conventions: ``query``/``key``/``value`` ``[B, N, E]`` (``[N, B, E]`` when
    ``batch_first=False``, ``[N, E]`` unbatched); key and value have the query's length ``N``
    (segments are positions of one sequence). Every argument is honoured or refused:

    - ``key_padding_mask`` ``[B, N]`` (bool: True = ignore that key; float: added to the scores)
      and ``attn_mask`` ``[N, N]`` or ``[B * H, N, N]`` (bool: True = not allowed; float: added)
      are honoured exactly, on top of the pattern, by the fused op (the Triton kernels on CUDA,
      the exact PyTorch implementation elsewhere). They become one SDPA-convention mask,
      built only from what was passed: a ``key_padding_mask`` alone stays ``[B, 1, 1, N]``, never
      ``N x N``. A float mask that requires grad raises ``NotImplementedError`` (masks get no
      gradient). A query row left with no key gives 0 (where ``nn.MultiheadAttention`` gives
      NaN). With right padding and a ``key_padding_mask`` each sequence gets exactly the result
      it gets alone.
    - ``is_causal=True`` applies the causal mask (itself, not as a hint about ``attn_mask``; both
      apply when both are given).
    - ``need_weights=True`` raises ``NotImplementedError``: sparse attention never forms the
      ``N x N`` weights (that is what keeps its cost below ``N^2``); the second output is always
      None.
      ``average_attn_weights`` only shapes those weights, so it has nothing to change.

    Example::

        >>> mhda = MultiheadDilatedAttention(512, 8, segment_lengths=(2048, 4096), dilation_rates=(1, 2))
        >>> x = torch.randn(2, 5000, 512)
        >>> y, _ = mhda(x, x, x, is_causal=True)
        >>> padding = torch.zeros(2, 5000, dtype=torch.bool)
        >>> padding[1, 4000:] = True                                  # sequence 1 has 4000 tokens
        >>> y, _ = mhda(x, x, x, key_padding_mask=padding)
        >>> compiled = torch.compile(mhda, backend="dilated_compile")
        >>> bigbird = MultiheadDilatedAttention(
        ...     512, 8, spec=BlockSparseSpec(64, local_blocks=1, global_blocks=1, random_blocks=2))
        >>> y, _ = bigbird(x, x, x, key_padding_mask=padding)          # [2, 5000, 512]
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = True,
        layer_norm: bool = True,
        gamma_init: float = 1.0,
        num_kv_heads: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        mode: str = "mixture",
        *,
        layer_norm_eps: float = 1e-5,
        position_embedding: nn.Module | None = None,
        spec: Any = None,
    ) -> None:
        super().__init__()
        spec = resolve_attention_spec(_NAME, spec, segment_lengths, dilation_rates, mode)
        embed_dim = check_positive_int(_NAME, "embed_dim", embed_dim)
        num_heads = check_positive_int(_NAME, "num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"{_NAME}: embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})"
            )
        num_kv_heads = (
            num_heads if num_kv_heads is None else check_positive_int(_NAME, "num_kv_heads", num_kv_heads)
        )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{_NAME}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        spec.check_num_heads(num_heads)
        self.spec = spec
        layout = getattr(spec, "layout", None)
        if layout is not None:  # a tensor the pattern carries: state that follows .to(device)
            layout = layout if device is None else layout.to(device)
            self.register_buffer("pattern_layout", layout, persistent=False)
            self._carry_layout()
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = check_probability(_NAME, "dropout", dropout)
        self.batch_first = bool(batch_first)
        self.gamma_init = float(gamma_init)
        factory = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.position_embedding = position_embedding
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # MAGNETO (Wang et al. 2022, Fig. 2): gain 1 for the query/key projections, gamma for
        # the value and output projections.
        for proj, gain in (
            (self.q_proj, 1.0),
            (self.k_proj, 1.0),
            (self.v_proj, self.gamma_init),
            (self.out_proj, self.gamma_init),
        ):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), ... replace the layout buffer: the spec carries the moved tensor.
        super()._apply(fn, recurse)
        self._carry_layout()
        return self

    def _carry_layout(self) -> None:
        """Make the spec carry the ``pattern_layout`` buffer (after it was moved)."""
        layout = self._buffers.get("pattern_layout")
        if layout is not None and layout is not self.spec.layout:
            self.spec = dataclasses.replace(self.spec, layout=layout)

    @property
    def layer_norm(self) -> bool:
        return self.norm is not None

    def extra_repr(self) -> str:
        if isinstance(self.spec, DilatedSpec):
            pattern = (
                f"segment_lengths={self.spec.segment_lengths}, dilation_rates={self.spec.dilation_rates}, "
                f"mode={self.spec.mode!r}"
            )
        else:
            pattern = f"spec={self.spec!r}"
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"{pattern}, dropout={self.dropout}, batch_first={self.batch_first}"
        )

    @classmethod
    def from_multihead_attention(
        cls,
        mha: nn.MultiheadAttention,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        mode: str = "mixture",
        *,
        spec: Any = None,
    ) -> MultiheadDilatedAttention:
        """A ``MultiheadDilatedAttention`` with the weights of ``mha`` (and no Sub-LN, like
        ``mha``), its pattern given as in the constructor (``segment_lengths``/``dilation_rates``
        or ``spec``). With one config whose segment covers the sequence and rate 1 (or a
        ``BlockSparseSpec`` whose band covers it) it computes what ``mha`` computes."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "from_multihead_attention: supports nn.MultiheadAttention without kdim/vdim, "
                "add_bias_kv and add_zero_attn"
            )
        weight = mha.in_proj_weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            segment_lengths,
            dilation_rates,
            spec=spec,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            layer_norm=False,
            device=weight.device,
            dtype=weight.dtype,
            mode=mode,
        )
        with torch.no_grad():
            for proj, w in zip((new.q_proj, new.k_proj, new.v_proj), weight.chunk(3)):
                proj.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    # --- the pieces ------------------------------------------------------------------------------

    def project(
        self, query: Tensor, key: Tensor, value: Tensor, start: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, E]`` inputs -> the heads ``[B, H, N, D]``, ``[B, Hkv, N, D]`` x 2, positions
        ``start .. start + N - 1`` applied; inside ``sequence_parallel`` the rows are this rank's
        shard and get its global positions (``sequence_positions``: one small all-gather, so
        every rank must call it), and ``start`` must be 0."""
        batch, seq_len, _ = query.shape
        q = self.q_proj(query).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.position_embedding is not None:
            # Inside sequence_parallel the rows are one rank's shard: arange would give them the
            # shard's local positions, wrong for every rank but the first.
            positions = context_positions(seq_len, device=query.device)
            if positions is None:
                positions = torch.arange(start, start + seq_len, device=query.device)
            elif start != 0:
                raise ValueError(
                    f"{_NAME}.project: start={start} inside sequence_parallel(...): the rows are a "
                    "shard of one sequence and get its global positions; pass start=0"
                )
            q, k = self.position_embedding(q, k, positions)
        return q, k, v

    def merge(self, heads: Tensor) -> Tensor:
        """``[B, H, N, D]`` -> ``out_proj(LN(concat heads))`` ``[B, N, E]``."""
        batch, _, seq_len, _ = heads.shape
        x = heads.transpose(1, 2).reshape(batch, seq_len, self.embed_dim)
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(x)

    # --- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if need_weights:
            raise NotImplementedError(
                f"{_NAME}: need_weights=True cannot be honoured: sparse attention (dilated or "
                "block-sparse) never forms the N x N attention weights (that is what keeps its cost "
                "below N^2). Pass need_weights=False; the second output is None."
            )
        check_attention_dropout(_NAME, "dropout", self.dropout, self.training)
        unbatched = query.dim() == 2
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != query.dim() or x.dim() not in (2, 3):
                layout = "[B, N, E]" if self.batch_first else "[N, B, E]"
                raise ValueError(
                    f"{_NAME}: query, key and value must all be {layout} (batch_first="
                    f"{self.batch_first}) or all [N, E] (unbatched), got {name} of shape {tuple(x.shape)} "
                    f"with query {tuple(query.shape)}"
                )
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, seq_len, _ = query.shape
        for name, x in (("key", key), ("value", value)):
            if x.shape[:2] != query.shape[:2] or x.shape[2] != self.embed_dim:
                raise ValueError(
                    f"{_NAME}: {name} must have the query's batch and length and embed_dim "
                    f"{self.embed_dim}: got {name} {tuple(x.shape)} for query {tuple(query.shape)} "
                    "(batch-first view). Sparse attention relates positions of one sequence; for "
                    "cross-attention between sequences of different lengths use nn.MultiheadAttention."
                )
        if query.shape[2] != self.embed_dim:
            raise ValueError(f"{_NAME}: query must have embed_dim {self.embed_dim}, got {tuple(query.shape)}")
        if sequence_parallel_is_open() and (key_padding_mask is not None or attn_mask is not None):
            # The masks index the shard's local positions, and sequence-parallel attention takes
            # a mask of every key of the sequence (with is_causal, none at all).
            raise NotImplementedError(
                f"{_NAME}: key_padding_mask and attn_mask are not supported inside "
                "sequence_parallel(...) (they index this rank's local positions); call "
                "F.scaled_dot_product_attention inside the context with attn_mask = this rank's rows "
                "against every key, [B or 1, H or 1, local length or 1, N] "
                "(docs/sequence_parallel.md), or run the module without sequence_parallel"
            )

        mask = _combine_masks(
            self._key_padding_view(key_padding_mask, batch, seq_len),
            self._attn_mask_view(attn_mask, batch, seq_len),
            query.dtype,
        )
        q, k, v = self.project(query, key, value)
        heads = attend(self.spec, q, k, v, is_causal=is_causal, attn_mask=mask)
        out = self.merge(heads)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _key_padding_view(self, mask: Tensor | None, batch: int, seq_len: int) -> Tensor | None:
        """``key_padding_mask`` ``[B, N]`` (True / -inf = ignore the key) as a ``[B, 1, 1, N]``
        view, in ``nn.MultiheadAttention``'s convention still."""
        if mask is None:
            return None
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(
                f"{_NAME}: key_padding_mask must have shape [batch, seq_len] = [{batch}, {seq_len}] "
                f"(or [seq_len] for unbatched inputs), got {tuple(mask.shape)}"
            )
        _check_mask_dtype("key_padding_mask", mask)
        return mask.view(batch, 1, 1, seq_len)

    def _attn_mask_view(self, mask: Tensor | None, batch: int, seq_len: int) -> Tensor | None:
        """``attn_mask`` ``[N, N]`` or ``[B * H, N, N]`` (True / -inf = not allowed) as a view
        ``[1, 1, N, N]`` or ``[B, H, N, N]``, in ``nn.MultiheadAttention``'s convention still."""
        if mask is None:
            return None
        if mask.dim() == 2 and tuple(mask.shape) == (seq_len, seq_len):
            view = mask.view(1, 1, seq_len, seq_len)
        elif mask.dim() == 3 and tuple(mask.shape) == (batch * self.num_heads, seq_len, seq_len):
            view = mask.view(batch, self.num_heads, seq_len, seq_len)
        else:
            raise ValueError(
                f"{_NAME}: attn_mask must have shape [N, N] = [{seq_len}, {seq_len}] or "
                f"[batch * num_heads, N, N] = [{batch * self.num_heads}, {seq_len}, {seq_len}], got "
                f"{tuple(mask.shape)}"
            )
        _check_mask_dtype("attn_mask", mask)
        return view

    # --- incremental decoding --------------------------------------------------------------------

    def new_cache(self) -> DilatedKVCache:
        """An empty decoding cache for ``forward_cached`` (a ``DilatedSpec`` module only:
        ``NotImplementedError`` for a block-sparse one, whose rows come from ``forward``)."""
        check_bounded_decoding(f"{_NAME}.new_cache", self.spec)
        return DilatedKVCache(self.spec)

    def forward_cached(self, x: Tensor, cache: DilatedKVCache) -> Tensor:
        """Causal self-attention of the tokens ``x`` that follow those already in ``cache``.

        ``x``: ``[B, T, E]`` (``[T, B, E]`` when ``batch_first=False``) at positions
        ``cache.position .. cache.position + T - 1``; returns the output for them, equal to the
        corresponding rows of ``forward(x_all, x_all, x_all, is_causal=True)[0]`` on the whole
        sequence so far. The first call on an empty cache runs the fused op over ``x`` (a
        prompt); later calls attend token by token over the cache. The cache is updated and keeps
        only the keys later tokens can attend (at most ``max(segment_lengths)``).

        Dilated attention only: for a ``BlockSparseSpec`` it raises ``NotImplementedError`` (call
        ``forward(x_all, x_all, x_all, is_causal=True)`` on the whole sequence instead).
        """
        check_bounded_decoding(f"{_NAME}.forward_cached", self.spec)
        check_attention_dropout(_NAME, "dropout", self.dropout, self.training)
        if sequence_parallel_is_open():
            raise NotImplementedError(
                f"{_NAME}.forward_cached: decoding with a KV cache inside sequence_parallel(...) is "
                "not supported: sequence-parallel attention is self-attention over one sharded "
                "sequence, while the cache holds keys of earlier calls and positions from its own "
                "count. Decode outside the context (gather_sequence the prompt first), or call "
                "forward on the whole sharded sequence"
            )
        if x.dim() != 3 or x.shape[2] != self.embed_dim:
            raise ValueError(
                f"{_NAME}.forward_cached: x must be [B, T, {self.embed_dim}], got {tuple(x.shape)}"
            )
        if cache.spec != self.spec:
            raise ValueError(
                f"{_NAME}.forward_cached: the cache is for {cache.spec}, this module uses {self.spec}"
            )
        if not self.batch_first:
            x = x.transpose(0, 1)
        start = cache.position
        q, k, v = self.project(x, x, x, start=start)
        if start == 0 and x.shape[1] > 1:
            heads = attend(self.spec, q, k, v, is_causal=True)
            cache.append(k, v)
            cache.evict()
        else:
            steps = []
            for i in range(x.shape[1]):
                cache.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
                steps.append(
                    dilated_attention_step(
                        q[:, :, i : i + 1],
                        cache.key,
                        cache.value,
                        self.spec,
                        position=start + i,
                        start=cache.start,
                    )
                )
                cache.evict()
            heads = torch.cat(steps, dim=2)
        out = self.merge(heads)
        return out if self.batch_first else out.transpose(0, 1)


def _check_mask_dtype(name: str, mask: Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{_NAME}: {name} must be bool (True = masked out) or floating point (added to the "
            f"scores), got {mask.dtype}"
        )


def _combine_masks(key_padding: Tensor | None, attn: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``nn.MultiheadAttention``'s masks (4-D views, bool True = masked out, or float added) as
    one mask in SDPA's convention (bool True = keep, or float added), or None.

    Both bool: ``keep = ~key_padding & ~attn``; otherwise a float mask in ``dtype`` (the query's),
    ``-inf`` where a bool one masks out, the two summed. Broadcasting keeps the shapes of what
    was passed: key padding alone stays ``[B, 1, 1, N]``; with an ``[N, N]`` mask the result is
    ``[B, 1, N, N]``."""
    masks = [m for m in (key_padding, attn) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        dropped = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~dropped
    biases = [_as_bias(m, dtype) for m in masks]
    return biases[0] if len(biases) == 1 else biases[0] + biases[1]


def _as_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask in ``nn.MultiheadAttention``'s convention as an additive float bias in ``dtype``."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
