"""Sequence-parallel attention over ``torch.distributed`` (docs/sequence_parallel.md).

Each rank holds a shard of the sequence (dim 2 of ``[B, H, N, D]``); inside
``sequence_parallel(...)`` SDPA computes, on every rank, that rank's rows of the single-device
attention of the whole sequence (dense, dilated or block-sparse), gradients included.

- ``group``: resolving a ProcessGroup / 1-D DeviceMesh / None;
- ``layout``: which positions a rank holds (contiguous, zigzag);
- ``collectives``, ``shard``: differentiable gathers, ``shard_sequence``/``gather_sequence``;
- ``signature``: the cross-rank check of each call class;
- ``plan``: one call's facts and the pattern's op on a key window;
- ``all_gather``, ``all_to_all``, ``ring``: the strategies; ``attention``: the dispatch;
- ``context``: ``sequence_parallel``.
"""

from .attention import STRATEGIES
from .context import sequence_parallel
from .layout import LAYOUTS
from .shard import gather_sequence, shard_sequence

__all__ = ["LAYOUTS", "STRATEGIES", "gather_sequence", "sequence_parallel", "shard_sequence"]
