"""Transformer layers with dilated attention, Sub-LN and MAGNETO initialisation
(Foundation Transformers, Wang et al. 2022), as LongNet uses them; ``spec=BlockSparseSpec(...)``
gives the same layers with block-sparse attention.

Sub-LN puts a LayerNorm at the input of each sublayer *and* one inside it, right before its
output projection:

    x = x + Dropout(W_o LN(Attention(LN(x) W_q, LN(x) W_k, LN(x) W_v)))
    x = x + Dropout(W_2 LN(act(LN(x) W_1)))

MAGNETO initialisation (Fig. 2 of the paper): ``W_q``, ``W_k`` ~ ``xavier_normal(gain=1)``;
``W_v``, ``W_o``, ``W_1``, ``W_2`` ~ ``xavier_normal(gain=gamma)``, i.e.
``N(0, gamma^2 * 2 / (fan_in + fan_out))``; biases 0, LayerNorms (1, 0). ``gamma`` depends on
depth: ``sqrt(log(2N))`` for an encoder-only or decoder-only stack of ``N`` layers; for an
encoder of ``N`` and a decoder of ``M`` layers, ``sqrt(log(3M) * log(2N) / 3)`` in the encoder
and ``sqrt(log(3M))`` in the decoder (``magneto_gamma``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_attention_dropout, check_positive_int, resolve_attention_spec
from .decoding import DilatedKVCache
from .multihead import MultiheadDilatedAttention

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def magneto_gamma(num_layers: int) -> float:
    """MAGNETO's init gain ``sqrt(log(2N))`` for an encoder-only or decoder-only stack of
    ``N = num_layers`` layers."""
    num_layers = check_positive_int("magneto_gamma", "num_layers", num_layers)
    return math.sqrt(math.log(2 * num_layers))


def magneto_gamma_encoder_decoder(num_encoder_layers: int, num_decoder_layers: int) -> tuple[float, float]:
    """MAGNETO's init gains ``(encoder, decoder)`` for ``N`` encoder and ``M`` decoder layers:
    ``(sqrt(log(3M) * log(2N) / 3), sqrt(log(3M)))``."""
    n = check_positive_int("magneto_gamma_encoder_decoder", "num_encoder_layers", num_encoder_layers)
    m = check_positive_int("magneto_gamma_encoder_decoder", "num_decoder_layers", num_decoder_layers)
    return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3), math.sqrt(math.log(3 * m))


def _activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}"
        )
    return _ACTIVATIONS[activation]


class _SubLNFeedForward(nn.Module):
    """``W_2 LN(act(x W_1))`` with MAGNETO's init (the block's input LN lives in the layer)."""

    def __init__(self, d_model, dim_feedforward, activation, dropout, layer_norm_eps, gamma_init, factory):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim_feedforward, eps=layer_norm_eps, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_normal_(linear.weight, gain=gamma_init)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.norm(self.dropout(self.activation(self.linear1(x)))))


class DilatedTransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward layer with dilated attention, Sub-LN and MAGNETO init::

        x = src + Dropout(self_attn(norm1(src)))              # self_attn ends in LN + W_o
        x = x + Dropout(W_2 LN(act(norm2(x) W_1)))

    (see the module docstring for the formulae). Used causally it is a decoder-only block.

    Args:
        d_model, nhead: width and query heads.
        segment_lengths, dilation_rates, mode: the dilated pattern (``DilatedSpec``); or give
            ``spec`` instead.
        dim_feedforward: FFN width.
        dropout: dropout on the residual branches and inside the FFN (honoured in training).
            Unlike ``nn.TransformerEncoderLayer`` it does not drop attention weights; that is
            ``attention_dropout``, which must be 0 in training mode.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or a callable.
        layer_norm_eps: of every LayerNorm.
        gamma_init: MAGNETO's gain (``magneto_gamma(num_layers)`` in a stack; ``LongNet`` and
            ``LongNetLM`` pass it).
        batch_first: ``[B, N, E]`` (True) or ``[N, B, E]``.
        attention_dropout: see ``MultiheadDilatedAttention(dropout=...)``.
        num_kv_heads: key/value heads (grouped-query attention).
        bias: of the attention projections.
        position_embedding: ``RotaryEmbedding``/``XPos`` applied to queries and keys.
        spec: the pattern as a spec (``DilatedSpec`` or ``BlockSparseSpec``) instead of
            ``segment_lengths``/``dilation_rates``/``mode``; exactly one of the two ways.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` as in
    ``nn.TransformerEncoderLayer``; the masks follow ``nn.MultiheadAttention``'s conventions and
    are honoured exactly (``MultiheadDilatedAttention``).

    Example::

        >>> layer = DilatedTransformerEncoderLayer(
        ...     512, 8, segment_lengths=(1024, 2048), dilation_rates=(1, 2), dim_feedforward=2048,
        ...     gamma_init=magneto_gamma(12))
        >>> y = layer(torch.randn(2, 3000, 512), is_causal=True)
        >>> sparse = DilatedTransformerEncoderLayer(512, 8, spec=BlockSparseSpec(128, local_blocks=2))
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        batch_first: bool = True,
        attention_dropout: float = 0.0,
        num_kv_heads: int | None = None,
        mode: str = "mixture",
        bias: bool = True,
        position_embedding: nn.Module | None = None,
        spec: Any = None,
    ) -> None:
        super().__init__()
        spec = resolve_attention_spec(type(self).__name__, spec, segment_lengths, dilation_rates, mode)
        factory = {"device": device, "dtype": dtype}
        self.batch_first = bool(batch_first)
        self.gamma_init = float(gamma_init)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.self_attn = MultiheadDilatedAttention(
            d_model,
            nhead,
            spec=spec,
            dropout=attention_dropout,
            bias=bias,
            batch_first=True,
            layer_norm=True,
            gamma_init=gamma_init,
            num_kv_heads=num_kv_heads,
            layer_norm_eps=layer_norm_eps,
            position_embedding=position_embedding,
            **factory,
        )
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.ffn = _SubLNFeedForward(
            d_model, dim_feedforward, activation, dropout, layer_norm_eps, gamma_init, factory
        )
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        check_attention_dropout(
            type(self).__name__, "attention_dropout", self.self_attn.dropout, self.training
        )
        x = src if self.batch_first or src.dim() == 2 else src.transpose(0, 1)
        h = self.norm1(x)
        h, _ = self.self_attn(
            h, h, h, key_padding_mask=src_key_padding_mask, attn_mask=src_mask, is_causal=is_causal
        )
        x = x + self.dropout1(h)
        x = x + self.dropout2(self.ffn(self.norm2(x)))
        return x if self.batch_first or src.dim() == 2 else x.transpose(0, 1)

    def forward_cached(self, x: Tensor, cache: DilatedKVCache) -> Tensor:
        """The causal forward of the tokens ``x`` ``[B, T, E]`` (batch first) following those in
        ``cache`` (see ``MultiheadDilatedAttention.forward_cached``)."""
        check_attention_dropout(
            type(self).__name__, "attention_dropout", self.self_attn.dropout, self.training
        )
        h = self.norm1(x)
        x = x + self.dropout1(self.self_attn.forward_cached(h, cache))
        return x + self.dropout2(self.ffn(self.norm2(x)))


class DilatedTransformerDecoderLayer(nn.Module):
    """Self-attention + cross-attention + feed-forward layer with dilated attention, Sub-LN and
    MAGNETO init (LongNet's encoder–decoder)::

        x = tgt + Dropout(self_attn(norm1(tgt)))
        x = x + Dropout(multihead_attn(norm2(x), memory, memory))
        x = x + Dropout(W_2 LN(act(norm3(x) W_1)))

    Both attentions are ``MultiheadDilatedAttention`` with Sub-LN and the same pattern. The
    cross-attention is sparse too, so ``memory`` must have the length of ``tgt`` (the pattern
    relates positions of one sequence; a different length raises ``ValueError``).

    Args: as ``DilatedTransformerEncoderLayer`` (``gamma_init``: ``magneto_gamma_encoder_decoder``).

    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False)`` as in
    ``nn.TransformerDecoderLayer``; every mask is honoured exactly; ``memory_is_causal=True``
    lets position ``p`` of ``tgt`` read positions ``<= p`` of ``memory``.

    Example::

        >>> layer = DilatedTransformerDecoderLayer(256, 4, segment_lengths=(512, 1024), dilation_rates=(1, 2))
        >>> tgt, memory = torch.randn(2, 1500, 256), torch.randn(2, 1500, 256)
        >>> y = layer(tgt, memory, tgt_is_causal=True)
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        batch_first: bool = True,
        attention_dropout: float = 0.0,
        num_kv_heads: int | None = None,
        mode: str = "mixture",
        bias: bool = True,
        position_embedding: nn.Module | None = None,
        spec: Any = None,
    ) -> None:
        super().__init__()
        spec = resolve_attention_spec(type(self).__name__, spec, segment_lengths, dilation_rates, mode)
        factory = {"device": device, "dtype": dtype}
        self.batch_first = bool(batch_first)
        self.gamma_init = float(gamma_init)
        attention = dict(
            spec=spec,
            dropout=attention_dropout,
            bias=bias,
            batch_first=True,
            layer_norm=True,
            gamma_init=gamma_init,
            num_kv_heads=num_kv_heads,
            layer_norm_eps=layer_norm_eps,
            position_embedding=position_embedding,
            **factory,
        )
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.self_attn = MultiheadDilatedAttention(d_model, nhead, **attention)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.multihead_attn = MultiheadDilatedAttention(d_model, nhead, **attention)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.ffn = _SubLNFeedForward(
            d_model, dim_feedforward, activation, dropout, layer_norm_eps, gamma_init, factory
        )
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        if tgt.shape != memory.shape:
            raise ValueError(
                "DilatedTransformerDecoderLayer: memory must have the shape of tgt (the cross-attention "
                f"is dilated, so it relates positions of one length), got tgt {tuple(tgt.shape)} and "
                f"memory {tuple(memory.shape)}"
            )
        check_attention_dropout(
            type(self).__name__, "attention_dropout", self.self_attn.dropout, self.training
        )
        swap = not self.batch_first and tgt.dim() == 3
        x = tgt.transpose(0, 1) if swap else tgt
        memory = memory.transpose(0, 1) if swap else memory
        h = self.norm1(x)
        h, _ = self.self_attn(
            h, h, h, key_padding_mask=tgt_key_padding_mask, attn_mask=tgt_mask, is_causal=tgt_is_causal
        )
        x = x + self.dropout1(h)
        h, _ = self.multihead_attn(
            self.norm2(x),
            memory,
            memory,
            key_padding_mask=memory_key_padding_mask,
            attn_mask=memory_mask,
            is_causal=memory_is_causal,
        )
        x = x + self.dropout2(h)
        x = x + self.dropout3(self.ffn(self.norm3(x)))
        return x.transpose(0, 1) if swap else x
