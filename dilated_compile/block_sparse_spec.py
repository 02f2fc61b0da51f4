"""``BlockSparseSpec``: which block-sparse attention pattern to compute.

Positions are cut into blocks of ``block_size`` (the last may be shorter). Query block ``i``
attends key block ``j`` when the layout keeps ``(i, j)``; within a kept block every pair attends
(then ``is_causal`` and masks apply on top). The layout is the union of a band of local blocks,
global blocks (rows and columns), random blocks drawn per head from ``seed``, and an explicit
``layout`` tensor. It is built from the sequence length at run time, on the inputs' device, so
one spec serves every length (``dilated_compile.ops.block_sparse_layout``).

A spec is frozen and hashable and is validated once, here. An explicit ``layout`` tensor is held
by reference: two specs are equal when their fields are equal and their layouts are the same
tensor (the same memory, shape and strides; equal values elsewhere do not count, and the values
are never read to hash). The tensor travels through compiled graphs and exports as a graph input (never inside
the JSON payload, which records only its shape).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

import torch

__all__ = ["BlockSparseSpec"]

_MAX_SEED = 2**31


def _int_field(field: str, value: Any, minimum: int) -> int:
    # bool is an Integral, but True as a block count is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"BlockSparseSpec: {field} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"BlockSparseSpec: {field} must be >= {minimum}, got {int(value)}")
    return int(value)


def _check_layout(layout: Any) -> torch.Tensor | None:
    """The layout as a ``[H or 1, Mq, Mk]`` bool tensor (a 2-D one gets a head dim of 1)."""
    if layout is None:
        return None
    if not isinstance(layout, torch.Tensor):
        raise ValueError(
            f"BlockSparseSpec: layout must be a bool torch.Tensor [H or 1, Mq, Mk] or None, got "
            f"{type(layout).__name__}"
        )
    if layout.dtype != torch.bool:
        raise ValueError(
            f"BlockSparseSpec: layout must be a bool tensor (True = the query block attends the "
            f"key block), got {layout.dtype}; use layout.bool() or layout != 0"
        )
    if layout.dim() not in (2, 3):
        raise ValueError(
            f"BlockSparseSpec: layout must be [H or 1, Mq, Mk] (or [Mq, Mk] for every head), got "
            f"shape {tuple(layout.shape)}"
        )
    if layout.requires_grad:
        raise ValueError("BlockSparseSpec: layout must not require grad")
    if 0 in layout.shape:
        raise ValueError(f"BlockSparseSpec: layout must not be empty, got shape {tuple(layout.shape)}")
    return layout if layout.dim() == 3 else layout.unsqueeze(0)


def _layout_identity(layout: torch.Tensor | None) -> tuple | None:
    """Which tensor a layout is, without reading it: its memory and geometry (two views of one
    tensor with the same shape are the same layout; equal values in other memory are not)."""
    if layout is None:
        return None
    return (str(layout.device), layout.untyped_storage().data_ptr(), layout.storage_offset(),
            tuple(layout.shape), tuple(layout.stride()))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseSpec:
    """A block-sparse attention pattern (BigBird / Longformer / sparse-transformer family).

    Args:
        block_size: positions per block (``>= 1``; the last block of a sequence may be shorter).
        local_blocks: the band: query block ``i`` attends key blocks ``j`` with
            ``|i - j| <= local_blocks`` (``0``, the default, is the diagonal block alone);
            ``None``: no band at all (a pattern of global, random or explicit blocks only).
        global_blocks: the first ``g`` blocks are global: query blocks ``i < g`` attend every key
            block, and every query block attends key blocks ``j < g``.
        random_blocks: that many distinct key blocks per query block, drawn per head from
            ``seed`` (the same on every device and every run), from all key blocks of the
            sequence; they may coincide with blocks the other parts keep.
        seed: the random blocks' seed, ``0 <= seed < 2**31``.
        layout: an explicit bool tensor ``[H or 1, Mq, Mk]`` (``[Mq, Mk]`` means one for every
            head), True where query block ``i`` attends key block ``j``. Rows and columns are
            blocks of *positions*: with a KV cache (fewer queries than keys) the queries' rows
            are those of their positions. It must cover the sequence's blocks
            (``Mq, Mk >= ceil(N / block_size)``); a larger layout is cut to the sequence, so one
            layout serves every length up to ``Mq * block_size``.

    Raises:
        ValueError: naming the field and the value, when the spec is malformed or keeps nothing.

    Example::

        >>> BlockSparseSpec(128, local_blocks=4)                      # a band of 9 blocks
        >>> BlockSparseSpec(64, local_blocks=1, global_blocks=2, random_blocks=3, seed=0)  # BigBird
        >>> BlockSparseSpec(128, local_blocks=None, layout=my_layout)  # exactly my_layout
    """

    block_size: int = 128
    _: dataclasses.KW_ONLY
    local_blocks: int | None = 0
    global_blocks: int = 0
    random_blocks: int = 0
    seed: int = 0
    layout: torch.Tensor | None = None

    def __post_init__(self) -> None:
        set_field = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_field("block_size", _int_field("block_size", self.block_size, 1))
        if self.local_blocks is not None:
            set_field("local_blocks", _int_field("local_blocks", self.local_blocks, 0))
        set_field("global_blocks", _int_field("global_blocks", self.global_blocks, 0))
        set_field("random_blocks", _int_field("random_blocks", self.random_blocks, 0))
        seed = _int_field("seed", self.seed, 0)
        if seed >= _MAX_SEED:
            raise ValueError(f"BlockSparseSpec: seed must be < 2**31, got {seed}")
        set_field("seed", seed)
        set_field("layout", _check_layout(self.layout))
        if (self.local_blocks is None and not self.global_blocks and not self.random_blocks
                and self.layout is None):
            raise ValueError(
                "BlockSparseSpec: the pattern keeps no block: with local_blocks=None give "
                "global_blocks, random_blocks or a layout"
            )
        # Formatted once, here: under torch.compile(dynamic=True) ints of a spec made outside
        # the compiled code are traced as symbols, which cannot be formatted into a string.
        set_field("_json", self._format_json())

    # -- identity ----------------------------------------------------------------------------------

    def _key(self) -> tuple:
        return (self.block_size, self.local_blocks, self.global_blocks, self.random_blocks,
                self.seed, _layout_identity(self.layout))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockSparseSpec):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [f"block_size={self.block_size}", f"local_blocks={self.local_blocks}"]
        for name in ("global_blocks", "random_blocks"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)}")
        if self.random_blocks:
            parts.append(f"seed={self.seed}")
        if self.layout is not None:
            parts.append(f"layout=<bool {list(self.layout.shape)}>")
        return f"BlockSparseSpec({', '.join(parts)})"

    # -- shapes ------------------------------------------------------------------------------------

    def num_blocks(self, seq_len: int) -> int:
        """Blocks of a sequence of ``seq_len`` positions: ``ceil(seq_len / block_size)``."""
        return -(-seq_len // self.block_size)

    def check_num_heads(self, num_heads: int, argument: str = "query") -> None:
        """Raise ValueError when a per-head layout does not match ``num_heads``."""
        if self.layout is not None and self.layout.shape[0] not in (1, num_heads):
            raise ValueError(
                f"BlockSparseSpec: layout has {self.layout.shape[0]} heads but the {argument} has "
                f"{num_heads}; give a layout of 1 or {num_heads} heads"
            )

    def check_length(self, seq_len: int) -> None:
        """Raise ValueError when an explicit layout does not cover ``seq_len`` positions."""
        if self.layout is None:
            return
        blocks = self.num_blocks(seq_len)
        if self.layout.shape[1] < blocks or self.layout.shape[2] < blocks:
            raise ValueError(
                f"BlockSparseSpec: the layout {list(self.layout.shape)} covers fewer blocks than a "
                f"sequence of {seq_len} positions has ({blocks} of {self.block_size}); give a "
                f"layout of at least {blocks} x {blocks} blocks"
            )

    # -- the annotation payload ------------------------------------------------------------------

    def to_json(self) -> str:
        """The pattern as JSON (the annotation payload in graphs); an explicit layout appears as
        its shape only: the tensor travels beside the payload."""
        return self._json

    def _format_json(self) -> str:
        layout = "null"
        if self.layout is not None:
            layout = "[" + ", ".join(str(int(d)) for d in self.layout.shape) + "]"
        local = "null" if self.local_blocks is None else str(self.local_blocks)
        # Keys sorted, as json.dumps(..., sort_keys=True) would write them.
        return (
            '{"block_size": ' + str(self.block_size) + ', "global_blocks": ' + str(self.global_blocks)
            + ', "kind": "block_sparse", "layout": ' + layout + ', "local_blocks": ' + local
            + ', "random_blocks": ' + str(self.random_blocks) + ', "seed": ' + str(self.seed) + "}"
        )

    @classmethod
    def from_json(cls, payload: str, layout: torch.Tensor | None = None) -> BlockSparseSpec:
        """The spec of ``payload``; ``layout`` is the tensor its ``"layout"`` shape announces."""
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("kind") != "block_sparse":
            raise ValueError(f"not a block-sparse annotation: {payload!r}")
        if (data["layout"] is None) != (layout is None):
            raise ValueError(
                f"block-sparse payload {payload!r} and the layout tensor given disagree "
                f"(tensor: {None if layout is None else list(layout.shape)})"
            )
        return cls(
            data["block_size"], local_blocks=data["local_blocks"], global_blocks=data["global_blocks"],
            random_blocks=data["random_blocks"], seed=data["seed"], layout=layout,
        )

    # -- from FlexAttention ----------------------------------------------------------------------

    @classmethod
    def from_block_mask(cls, block_mask: Any) -> BlockSparseSpec:
        """The spec of a FlexAttention ``BlockMask`` whose kept blocks are all *full* (every pair
        of a kept block attends), with square blocks and one batch entry.

        A partial block (kept with a ``mask_mod`` that removes some of its pairs) has no
        block-level equivalent: it raises ValueError naming the blocks. Causal masks are partial
        on the diagonal: build the mask without the causal part and pass ``is_causal=True`` to
        SDPA instead.

        Example::

            >>> from torch.nn.attention.flex_attention import create_block_mask
            >>> band = lambda b, h, q, k: (q // 128 - k // 128).abs() <= 2
            >>> mask = create_block_mask(band, None, None, 4096, 4096, BLOCK_SIZE=128)
            >>> spec = BlockSparseSpec.from_block_mask(mask)   # == the band of local_blocks=2
        """
        block_size = getattr(block_mask, "BLOCK_SIZE", None)
        if block_size is None or not hasattr(block_mask, "kv_num_blocks"):
            raise TypeError(
                f"BlockSparseSpec.from_block_mask takes a FlexAttention BlockMask, got "
                f"{type(block_mask).__name__}"
            )
        q_block, kv_block = (int(b) for b in block_size)
        if q_block != kv_block:
            raise ValueError(
                f"BlockSparseSpec.from_block_mask: the BlockMask's blocks are {q_block} x {kv_block}; "
                "block-sparse attention needs square blocks (create_block_mask(..., BLOCK_SIZE=n))"
            )
        partial = block_mask.kv_num_blocks
        if partial.shape[0] != 1:
            raise ValueError(
                f"BlockSparseSpec.from_block_mask: the BlockMask has {partial.shape[0]} batch entries; "
                "a spec's layout is the same for every batch entry (create it with B=None)"
            )
        if block_mask.full_kv_num_blocks is None:
            raise ValueError(
                "BlockSparseSpec.from_block_mask: the BlockMask does not say which blocks are full "
                "(it was built without full blocks); build it with create_block_mask"
            )
        if bool((partial > 0).any()):
            heads, rows = torch.nonzero(partial[0] > 0, as_tuple=True)
            where = ", ".join(
                f"(head {h}, query block {r})" for h, r in zip(heads[:4].tolist(), rows[:4].tolist()))
            raise ValueError(
                "BlockSparseSpec.from_block_mask: the BlockMask keeps partial blocks, whose pairs its "
                f"mask_mod decides one by one, e.g. at {where}; a block-sparse spec keeps whole "
                "blocks. Make the mask_mod block-aligned (a causal part belongs in is_causal=True)."
            )
        full = block_mask.full_kv_num_blocks[0]  # [H, Mq]
        indices = block_mask.full_kv_indices[0]  # [H, Mq, Mk]
        heads, rows, width = indices.shape
        slots = torch.arange(width, device=indices.device)
        kept = slots.view(1, 1, width) < full.unsqueeze(-1)
        # Slots past a row's count hold leftovers: send them to a spare column, then drop it.
        target = torch.where(kept, indices.long(), width)
        layout = torch.zeros(heads, rows, width + 1, dtype=torch.bool, device=indices.device)
        layout.scatter_(2, target, True)
        return cls(q_block, local_blocks=None, layout=layout[..., :width].contiguous())

