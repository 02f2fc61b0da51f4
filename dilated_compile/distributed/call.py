"""``SequenceParallelCall``: the spec of the sequence-parallel family, what one SDPA call inside
``sequence_parallel(...)`` computes.

Under ``torch.compile`` the context captures such a call as the plain SDPA node and an
``annotation`` node (``dilated_compile.ops.annotation``) whose payload is the call's JSON
(``"kind": "sequence_parallel"``), whose pattern tensor is the pattern's own (a block-sparse
layout) and whose ``attn_mask`` is the call's mask (it covers every key of the sequence, so it
cannot be the SDPA node's). The rewrite pass turns the pair into
``torch.ops.dilated_compile.sequence_parallel_attention``, whose arguments are the call's
fields (``SequenceParallelCall.op_args``); the op rebuilds the call from them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from ..attention_family import describe, family_of_payload, family_of_spec
from ..ops.sequence_parallel_attention import DENSE

KIND = "sequence_parallel"


@dataclasses.dataclass(frozen=True)
class SequenceParallelCall:
    """One SDPA call inside ``sequence_parallel(...)``: what the op needs besides the tensors.

    Attributes:
        pattern: the attention's spec (``DilatedSpec``, ``BlockSparseSpec``) or None (dense).
        layout: ``"contiguous"`` or ``"zigzag"``.
        strategy: ``"auto"``, ``"all_gather"``, ``"all_to_all"`` or ``"ring"``.
        group_name: the process group's ``group_name``: a string, so it can be an op argument
            and part of every compiled-artifact cache key; resolved to the group when the op runs.
    """

    pattern: Any
    layout: str
    strategy: str
    group_name: str

    @property
    def process_group(self) -> Any:
        """The ProcessGroup named ``group_name`` (what ``sequence_parallel_attention`` reads)."""
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(self.group_name)

    def pattern_json(self) -> str:
        """The op's ``pattern`` argument: ``"dense"`` or the spec's JSON."""
        return DENSE if self.pattern is None else self.pattern.to_json()

    def pattern_tensor(self) -> torch.Tensor | None:
        """The tensor the pattern carries (a block-sparse layout), else None."""
        if self.pattern is None:
            return None
        return family_of_spec(self.pattern).spec_tensor(self.pattern)

    def to_json(self) -> str:
        """The annotation payload. Written by hand (keys sorted, as ``json.dumps(...,
        sort_keys=True)`` would) because Dynamo traces it and cannot trace the json module."""
        pattern = '"dense"' if self.pattern is None else self.pattern.to_json()
        return (
            '{"group": "' + self.group_name + '", "kind": "' + KIND + '", "layout": "' + self.layout
            + '", "pattern": ' + pattern + ', "strategy": "' + self.strategy + '"}'
        )

    @classmethod
    def from_json(cls, payload: str, tensor: torch.Tensor | None = None) -> SequenceParallelCall:
        """The call of ``payload``; ``tensor`` is the pattern's tensor (a block-sparse layout)."""
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ValueError(f"not a sequence-parallel annotation: {payload!r}")
        pattern = data["pattern"]
        pattern = DENSE if pattern == DENSE else json.dumps(pattern, sort_keys=True)
        return cls.from_op_args(pattern, tensor, data["layout"], data["strategy"], data["group"])

    @classmethod
    def from_op_args(cls, pattern: str, tensor: torch.Tensor | None, layout: str, strategy: str,
                     group_name: str) -> SequenceParallelCall:
        """The call of the op's arguments (``pattern``: ``"dense"`` or a spec's JSON)."""
        if pattern == DENSE:
            if tensor is not None:
                raise ValueError("a dense sequence-parallel call carries no pattern tensor")
            spec = None
        else:
            spec = family_of_payload(pattern).from_json(pattern, tensor)
        return cls(spec, layout, strategy, group_name)

    def op_args(self, tensor: Any) -> tuple:
        """The op's arguments between ``v`` and ``is_causal``; ``tensor`` stands for the pattern's
        tensor (the tensor, or its node in a graph)."""
        return (self.pattern_json(), tensor, self.layout, self.strategy, self.group_name)

    def __str__(self) -> str:
        pattern = "dense" if self.pattern is None else describe(self.pattern)
        return f"{pattern}, layout={self.layout!r}, strategy={self.strategy!r}, group={self.group_name!r}"
