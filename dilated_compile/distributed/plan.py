"""What one sequence-parallel call knows: the group, this rank, the layout and the global length;
and the pattern's op for any key window (``dense`` is the dilated op with one segment)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from ..attention_family import family_of_spec
from ..block_sparse_spec import BlockSparseSpec
from ..ops import dilated_attention_op
from ..spec import DilatedSpec
from .layout import chunk_ranges


@dataclasses.dataclass(frozen=True)
class Plan:
    """One call: ``spec`` (None: dense), ``n`` global positions over ``world`` ranks of ``group``."""

    spec: Any
    group: dist.ProcessGroup
    rank: int
    world: int
    layout: str
    n: int
    is_causal: bool
    scale: float | None

    def ranges(self, rank: int | None = None) -> list[tuple[int, int]]:
        """``rank``'s (default: this rank's) global ``[start, end)`` ranges, in local order."""
        return chunk_ranges(self.n, self.world, self.layout, self.rank if rank is None else rank)

    @property
    def kind(self) -> str:
        if self.spec is None:
            return "dense"
        return "dilated" if isinstance(self.spec, DilatedSpec) else "block_sparse"


def connected_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that depends on ``tensors``: the sum of an empty slice of each, which keeps them in
    the autograd graph without reading a value (``x.sum() * 0`` is NaN once a half-precision sum
    overflows). Added to an output no row of which attends a key, it keeps the rank's backward,
    and the collectives in it, in step with the other ranks'."""
    return sum(x.narrow(0, 0, 0).sum() for x in tensors)


def dense_attention(q, k, v, is_causal: bool, scale, attn_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with its lse: the dilated op with one segment covering the keys, rate 1."""
    return dilated_attention_op(q, k, v, [max(k.shape[2], 1)], [1], "mixture", is_causal, scale, attn_mask)


def pattern_attention(spec, q, k, v, is_causal: bool, scale, attn_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec``'s op (dense when None) on ``q`` (the last ``Nq`` positions of the keys)."""
    if spec is None:
        return dense_attention(q, k, v, is_causal, scale, attn_mask)
    family = family_of_spec(spec)
    return family.op(q, k, v, *family.pattern_args(spec, family.spec_tensor(spec)), is_causal, scale,
                     attn_mask)


def block_layout_tensor(spec: BlockSparseSpec, num_heads: int, n: int, is_causal: bool,
                        device: torch.device) -> torch.Tensor:
    """The kept blocks of ``spec`` on a sequence of ``n``: ``[H', M, M]`` bool (``H'`` = 1 when
    every head keeps the same blocks, else ``num_heads``), from the op's own block index."""
    from ..ops._block_layout import build_block_index

    index = build_block_index(
        spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks, spec.seed,
        spec.layout, num_heads, n, n, is_causal, device,
    )
    m = index.num_key_blocks
    blocks, counts = index.kv_indices.long(), index.kv_counts.long()
    slots = torch.arange(blocks.shape[-1], device=device).view(1, 1, -1)
    listed = slots < counts.unsqueeze(-1)
    target = torch.where(listed, blocks, m)
    kept = torch.zeros(blocks.shape[0], m, m + 1, dtype=torch.bool, device=device)
    kept = kept.scatter(2, target, True)[..., :m]
    dense = torch.arange(m, device=device) < index.dense_rows  # global rows walk every key block
    return kept | dense.view(1, m, 1)
