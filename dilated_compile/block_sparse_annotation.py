"""``block_sparse(...)``: mark the SDPA calls that compute block-sparse attention.

The block-sparse family's annotation: the same machinery as ``dilated(...)``
(``annotation.AttentionRegion``), registered with the rewrite pass and ``apply`` through its
``AttentionFamily``. An explicit layout travels with the annotation as a graph input.
"""

from __future__ import annotations

from typing import Any

import torch

from .annotation import AttentionRegion
from .attention_family import AttentionFamily, register_family
from .block_sparse_spec import BlockSparseSpec
from .ops import block_sparse_attention_op

__all__ = ["block_sparse"]


def resolve_block_sparse_spec(spec: BlockSparseSpec | None, fields: dict[str, Any]) -> BlockSparseSpec:
    """A ``BlockSparseSpec`` from either a spec or its fields (not both)."""
    if spec is not None:
        if fields:
            raise TypeError(
                f"pass either spec or the fields of a BlockSparseSpec, not both; got spec {spec!r} "
                f"and {sorted(fields)}"
            )
        if not isinstance(spec, BlockSparseSpec):
            raise TypeError(f"spec must be a BlockSparseSpec, got {type(spec).__name__}: {spec!r}")
        return spec
    return BlockSparseSpec(**fields)


class block_sparse(AttentionRegion):
    """Compute block-sparse attention for every ``F.scaled_dot_product_attention`` call inside.

    A context manager and a decorator, used like ``dilated``. Give either a ``BlockSparseSpec``
    or its fields (``block_size``, ``local_blocks``, ``global_blocks``, ``random_blocks``,
    ``seed``, ``layout``).

    Inside the region, SDPA calls take the usual ``[B, H, N, D]`` tensors (``enable_gqa=True``
    for fewer key/value heads) and honour ``attn_mask`` and ``is_causal`` on top of the block
    pattern, and ``scale``; the query may be shorter than the keys (a KV cache: query ``i``
    stands at position ``Nk - Nq + i``, so decoding gives the rows of the full forward).
    ``dropout_p > 0`` raises. Regions nest with ``dilated(...)``: the innermost wins. Eager mode
    and ``torch.compile(backend="dilated_compile")`` give the same numbers.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> from dilated_compile import block_sparse
        >>> q = k = v = torch.randn(1, 4, 1000, 64)
        >>> with block_sparse(block_size=64, local_blocks=1, global_blocks=1):
        ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> @block_sparse(block_size=128, local_blocks=4)
        ... def attend(q, k, v):
        ...     return F.scaled_dot_product_attention(q, k, v)
    """

    def __init__(self, spec: BlockSparseSpec | None = None, **fields: Any) -> None:
        super().__init__(resolve_block_sparse_spec(spec, fields))


def _pattern_args(spec: BlockSparseSpec, layout: Any) -> tuple:
    return (spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks, spec.seed,
            layout)


def _check(spec: BlockSparseSpec, query: torch.Tensor, key: torch.Tensor) -> None:
    spec.check_num_heads(query.shape[1])
    spec.check_length(key.shape[2])


register_family(AttentionFamily(
    kind="block_sparse",
    region_name="block_sparse",
    spec_type=BlockSparseSpec,
    op=block_sparse_attention_op,
    op_name="dilated_compile.block_sparse_attention",
    pattern_args=_pattern_args,
    spec_tensor=lambda spec: spec.layout,
    from_json=BlockSparseSpec.from_json,
    check=_check,
    region=block_sparse,
))
