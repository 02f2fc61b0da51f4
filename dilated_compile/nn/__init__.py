"""Modules built on plain SDPA inside an attention region: attention, transformer layers, LongNet.

Each module calls ``F.scaled_dot_product_attention`` inside the region of its pattern's family
(``dilated(spec)``, or ``block_sparse(spec)`` for a ``BlockSparseSpec``): eager mode runs the
fused op at once, and ``torch.compile(model, backend="dilated_compile")`` rewrites the annotated
calls into it. They are also the examples of how to write models for this library::

    import torch
    from dilated_compile.nn import LongNetLM

    lm = LongNetLM(num_tokens=256, d_model=256, nhead=8, num_layers=4, dim_feedforward=1024,
                   segment_lengths=(256, 512, 1024), dilation_rates=(1, 2, 4))
    logits = lm(torch.randint(0, 256, (2, 4096)))           # [2, 4096, 256]
    compiled = torch.compile(lm, backend="dilated_compile")

- ``DilatedAttention``: ``[B, N, H, D]`` dilated attention.
- ``MultiheadDilatedAttention``: shaped like ``nn.MultiheadAttention``; masks honoured exactly;
  ``spec=BlockSparseSpec(...)`` for block-sparse attention.
- ``DilatedTransformerEncoderLayer`` / ``DilatedTransformerDecoderLayer``: Sub-LN, MAGNETO init.
- ``LongNet`` (encoder–decoder), ``LongNetLM`` (decoder-only, bounded-cache decoding).
- ``create_multihead_dilated_attention``: the factory of earlier packages (kinds ``"auto"``,
  ``"eager"``, ``"compiled"``, ``"block_sparse"``); ``spec_from_sparse_config`` translates their
  block-sparse ``sparse_config``.
"""

from .attention import DilatedAttention
from .decoding import DilatedKVCache, LongNetLMCache, dilated_attention_step
from ._sparse_config import spec_from_sparse_config
from .factory import BLOCK_SPARSE_KINDS, KINDS, create_multihead_dilated_attention, resolve_kind
from .longnet import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS, LongNet, LongNetLM
from .masked import masked_dilated_attention
from .multihead import MultiheadDilatedAttention
from .positions import RotaryEmbedding, XPos
from .transformer import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    magneto_gamma,
    magneto_gamma_encoder_decoder,
)

__all__ = [
    "BLOCK_SPARSE_KINDS",
    "KINDS",
    "PAPER_DILATION_RATES",
    "PAPER_SEGMENT_LENGTHS",
    "DilatedAttention",
    "DilatedKVCache",
    "DilatedTransformerDecoderLayer",
    "DilatedTransformerEncoderLayer",
    "LongNet",
    "LongNetLM",
    "LongNetLMCache",
    "MultiheadDilatedAttention",
    "RotaryEmbedding",
    "XPos",
    "create_multihead_dilated_attention",
    "dilated_attention_step",
    "magneto_gamma",
    "magneto_gamma_encoder_decoder",
    "masked_dilated_attention",
    "resolve_kind",
    "spec_from_sparse_config",
]
