"""Sequence-parallel attention over ``torch.distributed`` (docs/sequence_parallel.md).

Each rank holds a shard of the sequence (dim 2 of ``[B, H, N, D]``); inside
``sequence_parallel(...)`` SDPA computes, on every rank, that rank's rows of the single-device
attention of the whole sequence (dense, dilated or block-sparse), gradients included.

- ``group``: resolving a ProcessGroup / 1-D DeviceMesh / None;
- ``layout``: which positions a rank holds (contiguous, zigzag);
- ``collectives``, ``shard``: differentiable gathers, ``shard_sequence``/``gather_sequence``;
- ``signature``: the cross-rank check of each call;
- ``plan``: one call's facts and the pattern's op on a key window;
- ``all_gather`` (with ``sparse_all_gather``, LongNet's exchange of the dilated rows a rank
  attends), ``all_to_all``, ``ring`` (with ``ring_schedule``, which rows each hop carries): the
  strategies; ``attention``: the dispatch;
- ``context``: ``sequence_parallel``; ``call``: the call's spec for the rewrite to
  ``torch.ops.dilated_compile.sequence_parallel_attention`` under ``torch.compile``;
- ``positions``: ``sequence_positions``, a shard's global positions (for position embeddings);
- ``errors``: failed collectives raise ``CollectiveError`` naming the collective.
"""

from .attention import STRATEGIES
from .context import sequence_parallel
from .errors import CollectiveError
from .layout import LAYOUTS
from .positions import sequence_positions
from .shard import gather_sequence, shard_sequence

__all__ = [
    "LAYOUTS", "STRATEGIES", "CollectiveError", "gather_sequence", "sequence_parallel",
    "sequence_positions", "shard_sequence",
]
