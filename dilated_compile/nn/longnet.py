"""LongNet (Ding et al. 2023): an encoder–decoder ``LongNet`` and a decoder-only language model
``LongNetLM``, built from the dilated transformer layers, with the paper's configuration as the
preset ``"paper"``. ``spec=BlockSparseSpec(...)`` builds the same models with block-sparse
attention."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..spec import DilatedSpec
from ._checks import check_bounded_decoding, check_positive_int, resolve_attention_spec
from .decoding import LongNetLMCache
from .positions import RotaryEmbedding, XPos
from .transformer import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    magneto_gamma,
    magneto_gamma_encoder_decoder,
)

#: LongNet's dilated pattern (Section 4.1): segment lengths and dilation rates.
PAPER_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES = (1, 2, 4, 6, 12)

# The paper's model: MAGNETO base size (768 wide, 12 heads, FFN 3072, 12 layers) with xPos and
# the pattern above; trained on sequences of up to 32k tokens.
_PAPER = dict(
    d_model=768, nhead=12, dim_feedforward=3072, segment_lengths=PAPER_SEGMENT_LENGTHS,
    dilation_rates=PAPER_DILATION_RATES, dropout=0.0, activation="gelu", positions="xpos",
)


# The arguments that give a preset's attention pattern (replaced by a spec= override).
_PATTERN_ARGUMENTS = ("segment_lengths", "dilation_rates", "mode")


def model_spec(owner: str, spec: Any, segment_lengths: Sequence[int] | None,
               dilation_rates: Sequence[int] | None, mode: str) -> Any:
    """The attention pattern of a model: ``spec``, or the dilated pattern of
    ``segment_lengths``/``dilation_rates`` (the paper's where None) when no spec is given."""
    if spec is None:
        segment_lengths = PAPER_SEGMENT_LENGTHS if segment_lengths is None else segment_lengths
        dilation_rates = PAPER_DILATION_RATES if dilation_rates is None else dilation_rates
    return resolve_attention_spec(owner, spec, segment_lengths, dilation_rates, mode)


def position_embedding(kind: str | None, head_dim: int, spec: Any) -> nn.Module | None:
    """``"xpos"`` (anchored on blocks of ``lcm(segment_lengths)``; dilated attention only),
    ``"rotary"`` or None."""
    if kind is None:
        return None
    if kind == "xpos":
        if not isinstance(spec, DilatedSpec):
            raise ValueError(
                f"positions='xpos' needs a dilated pattern: xPos is anchored on blocks of "
                f"lcm(segment_lengths) that no attention pair crosses, and {spec!r} relates "
                "positions across its blocks (unanchored xPos leaves the float32 range after some "
                "35k positions). Pass positions='rotary' (or None)."
            )
        return XPos(head_dim, block=math.lcm(*spec.segment_lengths))
    if kind == "rotary":
        return RotaryEmbedding(head_dim)
    raise ValueError(f"positions must be 'xpos', 'rotary' or None, got {kind!r}")


def _from_preset(cls, presets: dict[str, dict[str, Any]], name: str, overrides: dict[str, Any]):
    if name not in presets:
        raise ValueError(f"{cls.__name__}.from_preset: unknown preset {name!r}; available: {sorted(presets)}")
    preset = presets[name]
    if overrides.get("spec") is not None:  # a spec replaces the preset's dilated pattern
        preset = {k: v for k, v in preset.items() if k not in _PATTERN_ARGUMENTS}
    return cls(**{**preset, **overrides})


class LongNet(nn.Module):
    """LongNet encoder–decoder: ``num_encoder_layers`` dilated encoder layers and
    ``num_decoder_layers`` dilated decoder layers (Sub-LN, MAGNETO init with the
    encoder–decoder gains), each stack followed by a LayerNorm.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward: sizes.
        segment_lengths, dilation_rates, mode: the dilated pattern (None: the paper's); or give
            ``spec`` instead.
        dropout: residual/FFN dropout (honoured in training).
        activation: ``"gelu"`` (MAGNETO), ``"relu"``, ``"silu"`` or a callable.
        layer_norm_eps: of every LayerNorm.
        device, dtype: of the parameters.
        positions: ``None`` (the inputs carry their positions), ``"xpos"`` or ``"rotary"``
            (applied to queries and keys of every attention).
        num_kv_heads: key/value heads (grouped-query attention).
        attention_dropout: must be 0 in training mode (see ``MultiheadDilatedAttention``).
        spec: the pattern of every attention as a spec, instead of
            ``segment_lengths``/``dilation_rates``/``mode`` (exactly one of the two ways): a
            ``DilatedSpec`` or a ``BlockSparseSpec`` (then ``positions`` must be ``"rotary"`` or
            None: xPos is anchored on dilated segments).

    ``forward(src, tgt=None, *, is_causal=True, src_key_padding_mask=None,
    tgt_key_padding_mask=None)``: ``src`` ``[B, N, d_model]`` (embeddings); ``tgt`` defaults to
    ``src`` and must have its shape (the cross-attention is dilated). ``is_causal`` applies to the
    encoder, the decoder's self-attention and its cross-attention (position ``p`` reads memory
    ``<= p``), as in LongNet's language modelling. Returns ``[B, N, d_model]``.

    Example::

        >>> net = LongNet(d_model=256, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
        ...               dim_feedforward=1024, segment_lengths=(512, 1024), dilation_rates=(1, 2))
        >>> y = net(torch.randn(2, 3000, 256))
        >>> paper = LongNet.from_preset("paper")          # 768 wide, 12 + 12 layers, the paper's pattern
        >>> sparse = LongNet(d_model=256, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
        ...                  spec=BlockSparseSpec(128, local_blocks=2, global_blocks=1))
    """

    PRESETS: dict[str, dict[str, Any]] = {
        "paper": {**_PAPER, "num_encoder_layers": 12, "num_decoder_layers": 12},
    }

    def __init__(
        self,
        d_model: int = 768,
        nhead: int = 12,
        num_encoder_layers: int = 12,
        num_decoder_layers: int = 12,
        dim_feedforward: int = 3072,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        dropout: float = 0.0,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        layer_norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        positions: str | None = None,
        num_kv_heads: int | None = None,
        mode: str = "mixture",
        attention_dropout: float = 0.0,
        spec: Any = None,
    ) -> None:
        super().__init__()
        self.spec = model_spec("LongNet", spec, segment_lengths, dilation_rates, mode)
        num_encoder_layers = check_positive_int("LongNet", "num_encoder_layers", num_encoder_layers)
        num_decoder_layers = check_positive_int("LongNet", "num_decoder_layers", num_decoder_layers)
        gamma_encoder, gamma_decoder = magneto_gamma_encoder_decoder(num_encoder_layers, num_decoder_layers)
        factory = {"device": device, "dtype": dtype}
        self.position_embedding = position_embedding(positions, d_model // nhead, self.spec)
        common = dict(
            dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
            layer_norm_eps=layer_norm_eps, attention_dropout=attention_dropout, num_kv_heads=num_kv_heads,
            spec=self.spec, position_embedding=self.position_embedding, **factory,
        )
        self.encoder_layers = nn.ModuleList(
            DilatedTransformerEncoderLayer(d_model, nhead, gamma_init=gamma_encoder, **common)
            for _ in range(num_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.decoder_layers = nn.ModuleList(
            DilatedTransformerDecoderLayer(d_model, nhead, gamma_init=gamma_decoder, **common)
            for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LongNet:
        """A model of a named configuration (``LongNet.PRESETS``), arguments overridable."""
        return _from_preset(cls, cls.PRESETS, name, overrides)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor | None = None,
        *,
        is_causal: bool = True,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        if tgt is None:
            tgt = src
            if tgt_key_padding_mask is None:
                tgt_key_padding_mask = src_key_padding_mask
        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        memory = self.encoder_norm(memory)
        x = tgt
        for layer in self.decoder_layers:
            x = layer(
                x, memory, tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=src_key_padding_mask, tgt_is_causal=is_causal,
                memory_is_causal=is_causal,
            )
        return self.decoder_norm(x)


class LongNetLM(nn.Module):
    """LongNet language model (decoder-only, causal), as in the paper: token embedding, a stack
    of causal dilated layers (Sub-LN, MAGNETO init with ``gamma = sqrt(log(2 * num_layers))``),
    xPos or rotary positions on queries and keys, a final LayerNorm and the output projection.

    Args:
        num_tokens: vocabulary size.
        d_model, nhead, num_layers, dim_feedforward: sizes (defaults: the paper's base size).
        segment_lengths, dilation_rates, mode: the dilated pattern (None: the paper's); or give
            ``spec`` instead.
        dropout: residual/FFN dropout.
        activation: ``"gelu"`` (MAGNETO), ``"relu"``, ``"silu"`` or a callable.
        layer_norm_eps: of every LayerNorm.
        device, dtype: of the parameters.
        positions: ``"xpos"`` (the paper's; anchored on blocks of ``lcm(segment_lengths)``, see
            ``XPos``) or ``"rotary"``.
        num_kv_heads: key/value heads (grouped-query attention; the decoding cache shrinks too).
        attention_dropout: must be 0 in training mode (see ``MultiheadDilatedAttention``).
        spec: the pattern of every layer as a spec, instead of
            ``segment_lengths``/``dilation_rates``/``mode`` (exactly one of the two ways): a
            ``DilatedSpec``, or a ``BlockSparseSpec`` for a block-sparse language model (then
            ``positions="rotary"``: xPos is anchored on dilated segments; and no bounded-cache
            decoding: ``new_cache``/``decode``/``generate`` raise ``NotImplementedError``).

    ``forward(tokens, is_causal=True, key_padding_mask=None)``: ``tokens`` ``[B, N]`` int64 ->
    logits ``[B, N, num_tokens]``.

    Decoding: ``cache = lm.new_cache()``, then ``lm.decode(tokens, cache)`` for each new chunk of
    tokens (a prompt, then one token at a time) returns their logits, equal to those of
    ``forward`` on the whole sequence; the cache holds at most ``max(segment_lengths)`` tokens
    per layer, whatever the length. ``lm.generate(prompt, max_new_tokens)`` samples with it.
    Decoding is defined for a dilated pattern only (see ``DilatedKVCache``).

    Example::

        >>> lm = LongNetLM(num_tokens=256, d_model=128, nhead=4, num_layers=2, dim_feedforward=512,
        ...                segment_lengths=(64, 128, 256), dilation_rates=(1, 2, 4))
        >>> logits = lm(torch.randint(0, 256, (2, 1000)))                   # [2, 1000, 256]
        >>> text = lm.generate(torch.randint(0, 256, (1, 10)), max_new_tokens=500)
        >>> paper = LongNetLM.from_preset("paper", num_tokens=50_000)
        >>> sparse = LongNetLM(num_tokens=256, d_model=128, nhead=4, num_layers=2, positions="rotary",
        ...                    spec=BlockSparseSpec(64, local_blocks=2, global_blocks=1))
        >>> logits = sparse(torch.randint(0, 256, (2, 1000)))                # [2, 1000, 256]
    """

    PRESETS: dict[str, dict[str, Any]] = {"paper": {**_PAPER, "num_layers": 12}}

    def __init__(
        self,
        num_tokens: int,
        d_model: int = 768,
        nhead: int = 12,
        num_layers: int = 12,
        dim_feedforward: int = 3072,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        dropout: float = 0.0,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        layer_norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        positions: str = "xpos",
        num_kv_heads: int | None = None,
        mode: str = "mixture",
        attention_dropout: float = 0.0,
        num_encoder_layers: int | None = None,
        num_decoder_layers: int | None = None,
        spec: Any = None,
    ) -> None:
        super().__init__()
        if num_encoder_layers is not None or num_decoder_layers is not None:
            raise TypeError(
                "LongNetLM is decoder-only, like the paper's language model: pass num_layers=... "
                f"(got num_encoder_layers={num_encoder_layers}, num_decoder_layers={num_decoder_layers}); "
                "for an encoder-decoder use LongNet"
            )
        if positions is None:
            raise ValueError("LongNetLM: positions must be 'xpos' or 'rotary' (a causal LM needs positions)")
        self.spec = model_spec("LongNetLM", spec, segment_lengths, dilation_rates, mode)
        num_tokens = check_positive_int("LongNetLM", "num_tokens", num_tokens)
        num_layers = check_positive_int("LongNetLM", "num_layers", num_layers)
        factory = {"device": device, "dtype": dtype}
        self.num_tokens, self.d_model = num_tokens, d_model
        self.token_embedding = nn.Embedding(num_tokens, d_model, **factory)
        self.position_embedding = position_embedding(positions, d_model // nhead, self.spec)
        gamma = magneto_gamma(num_layers)
        self.layers = nn.ModuleList(
            DilatedTransformerEncoderLayer(
                d_model, nhead, spec=self.spec, dim_feedforward=dim_feedforward,
                dropout=dropout, activation=activation, layer_norm_eps=layer_norm_eps, gamma_init=gamma,
                attention_dropout=attention_dropout, num_kv_heads=num_kv_heads,
                position_embedding=self.position_embedding, **factory,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.out = nn.Linear(d_model, num_tokens, **factory)
        nn.init.normal_(self.token_embedding.weight, std=d_model**-0.5)
        nn.init.normal_(self.out.weight, std=d_model**-0.5)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LongNetLM:
        """A model of a named configuration (``LongNetLM.PRESETS``; ``num_tokens`` is required),
        arguments overridable."""
        return _from_preset(cls, cls.PRESETS, name, overrides)

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"LongNetLM: tokens must be an integer tensor [batch, seq_len], got {shape}")

    def forward(
        self, tokens: Tensor, is_causal: bool = True, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        self._check_tokens(tokens)
        x = self.token_embedding(tokens)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=key_padding_mask, is_causal=is_causal)
        return self.out(self.norm(x))

    # --- incremental decoding --------------------------------------------------------------------

    def new_cache(self) -> LongNetLMCache:
        """An empty decoding cache (one ``DilatedKVCache`` per layer); a dilated model only
        (``NotImplementedError`` for a block-sparse one: call ``forward`` on the whole
        sequence)."""
        check_bounded_decoding("LongNetLM.new_cache", self.spec)
        return LongNetLMCache([layer.self_attn.new_cache() for layer in self.layers])

    def decode(self, tokens: Tensor, cache: LongNetLMCache) -> Tensor:
        """Logits ``[B, T, num_tokens]`` of ``tokens`` ``[B, T]``, the continuation of the
        ``cache.position`` tokens fed before; equal to the last ``T`` rows of
        ``forward(all tokens so far)``. Updates ``cache``, which keeps at most
        ``max(segment_lengths)`` tokens per layer. The first call on an empty cache runs the
        fused op over the whole chunk (the prompt); later calls cost ``O(max segment)`` per
        token and layer."""
        check_bounded_decoding("LongNetLM.decode", self.spec)
        self._check_tokens(tokens)
        if len(cache.layers) != len(self.layers):
            raise ValueError(
                f"LongNetLM.decode: the cache has {len(cache.layers)} layers, the model {len(self.layers)}"
            )
        x = self.token_embedding(tokens)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer.forward_cached(x, layer_cache)
        return self.out(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``prompt`` ``[B, T]`` followed by ``max_new_tokens`` sampled tokens (greedy when
        ``temperature == 0``; only the ``top_k`` most likely when given), decoded with the
        bounded cache (a dilated model only, like ``decode``)."""
        check_bounded_decoding("LongNetLM.generate", self.spec)
        cache = self.new_cache()
        logits = self.decode(prompt, cache)[:, -1]
        pieces = [prompt]
        for i in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
            pieces.append(token.unsqueeze(-1))
            if i + 1 < max_new_tokens:
                logits = self.decode(token.unsqueeze(-1), cache)[:, -1]
        return torch.cat(pieces, dim=1)
