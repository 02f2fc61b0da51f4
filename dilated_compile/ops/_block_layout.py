"""The block-sparse pattern of one call, built on the device from the sequence's lengths.

``build_block_index`` turns a ``BlockSparseSpec``'s parts into the compact index the
implementations walk (the PyTorch one, the Triton kernels, the decomposition): for each query
block the sorted key blocks it keeps, and (for the backward) for each key block the query blocks
that keep it. Every tensor op has a static shape given the lengths, so the same code runs under
``torch.compile`` with a symbolic length, and the result is the same on every device.

Blocks are blocks of *positions*: with ``Nq < Nk`` (a KV cache) the queries are the positions
``Nk - Nq .. Nk - 1``, and index row ``r`` is position block ``first_block + r``,
``first_block = (Nk - Nq) // block_size``. A query block keeps key block ``j`` when

- ``|i - j| <= local_blocks`` (unless ``local_blocks`` is None),
- ``j < global_blocks`` (global columns), or ``i < global_blocks`` (global rows: every key block),
- ``j`` is one of its ``random_blocks`` draws (``random_key_blocks``), or
- the explicit ``layout[h, i, j]`` is True,

and, when causal, ``j <= i`` (later key blocks hold only future keys; the diagonal block is
masked element by element by the implementations). Global rows are not listed: their programs
walk every key block up to ``kv_counts`` (``j = slot``), which keeps the index linear in the
sequence length however many blocks a global row attends.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of int64 values below 2**32, exact in
    int64 arithmetic on every device."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def random_key_blocks(seed: int, num_heads: int, rows: Tensor, choices: Tensor, count: int) -> Tensor:
    """``count`` distinct key blocks per head and query block, uniform over ``[0, choices)``.

    Args:
        seed: the spec's seed (``< 2**31``).
        num_heads: the heads drawn for (each head its own draws).
        rows: ``[Mq]`` int64 position blocks of the query blocks.
        choices: ``[Mq]`` int64, how many key blocks each row draws from (``>= 0``).
        count: draws per row; a row with fewer than ``count`` choices takes all of them.

    Returns:
        ``[num_heads, Mq, count]`` int64: the draws, and ``-1`` for the slots of a row that ran
        out of choices. A draw depends on (seed, head, query block, slot, choices) only, so a
        query block draws the same blocks whatever the sequence around it, on every device.

    Sampling without replacement: slot ``t`` draws ``x`` uniformly from the ``choices - t``
    blocks not drawn yet, as a rank among them: walking the earlier draws in ascending order,
    ``x`` steps over each one it reaches.
    """
    device = rows.device
    head = torch.arange(num_heads, device=device, dtype=torch.int64).view(-1, 1)
    base = _mix32((seed * 0x27D4EB2D + head) & _M32)  # [H, 1]
    base = _mix32((base * 0x165667B1 + rows.view(1, -1)) & _M32)  # [H, Mq]
    chosen: list[Tensor] = []
    for t in range(count):
        left = choices.view(1, -1) - t  # blocks not drawn yet
        bits = _mix32((base * 0x165667B1 + t) & _M32)
        x = (bits * left.clamp_min(1)) >> 32  # uniform in [0, left)
        if chosen:
            for earlier in torch.sort(torch.stack(chosen, dim=-1), dim=-1).values.unbind(-1):
                x = x + (x >= earlier).to(x.dtype)
        chosen.append(torch.where(left > 0, x, -1))
    if not chosen:
        return torch.empty(num_heads, rows.numel(), 0, dtype=torch.int64, device=device)
    return torch.stack(chosen, dim=-1)


@dataclasses.dataclass(frozen=True)
class BlockIndex:
    """The kept blocks of one call (see the module docstring).

    Attributes:
        kv_indices: ``[H', Mq, W]`` int32: for each head and query block, its kept key blocks in
            ascending order, then filler (never read). ``H'`` is 1 when every head keeps the same
            blocks (no random blocks, no per-head layout), else the number of query heads.
        kv_counts: ``[H', Mq]`` int32: how many of ``kv_indices`` a row keeps; for a global row
            (``first_block + r < dense_rows_end``) the number of key blocks it walks, ``j = slot``.
        q_ptr: ``[H', Mk + 1]`` int32 or None: key block ``j``'s query blocks are
            ``q_indices[h, q_ptr[h, j]:q_ptr[h, j + 1]]`` (index rows, ascending), global rows
            excepted (every key block's programs walk those themselves).
        q_indices: ``[H', Mq * W]`` int32 or None.
        first_block: the position block of index row 0.
        num_query_blocks: ``Mq``; num_key_blocks: ``Mk``.
        dense_rows: index rows ``[0, dense_rows)`` are global rows.
    """

    kv_indices: Tensor
    kv_counts: Tensor
    q_ptr: Optional[Tensor]
    q_indices: Optional[Tensor]
    first_block: int
    num_query_blocks: int
    num_key_blocks: int
    dense_rows: int


def _candidate_blocks(rows, num_key_blocks, heads, local_blocks, global_blocks, random_blocks,
                      seed, is_causal):
    """``[H', Mq, W]`` int64 key blocks each row keeps by the band, the global columns and the
    random draws (duplicates and out-of-range values included; -1 for unused draws)."""
    device = rows.device
    parts = []
    if local_blocks is not None:
        band = torch.arange(-local_blocks, local_blocks + 1, device=device, dtype=torch.int64)
        parts.append((rows.view(-1, 1) + band.view(1, -1)).unsqueeze(0))
    if global_blocks:
        columns = torch.arange(global_blocks, device=device, dtype=torch.int64)
        parts.append(columns.view(1, 1, -1).expand(1, rows.numel(), global_blocks))
    if random_blocks:
        # Causal rows draw among the blocks they can see, so a query block's draws do not depend
        # on the sequence's length (decoding with a cache gives the rows of the full forward).
        choices = torch.clamp(rows + 1, max=num_key_blocks) if is_causal else (
            torch.zeros_like(rows) + num_key_blocks)
        parts.append(random_key_blocks(seed, heads, rows, choices, random_blocks))
    width = sum(p.shape[-1] for p in parts)
    if not parts:  # an explicit layout alone
        return torch.empty(heads, rows.numel(), 0, dtype=torch.int64, device=device), 0
    return torch.cat([p.expand(heads, rows.numel(), p.shape[-1]) for p in parts], dim=-1), width


def _sorted_unique(blocks: Tensor, valid: Tensor, sentinel: int) -> tuple[Tensor, Tensor]:
    """Each row's valid entries, sorted and without repeats, then ``sentinel``s: (blocks, count)."""
    blocks = torch.where(valid, blocks, sentinel).sort(dim=-1).values
    # Functional ops only: the decompositions trace this for export.
    repeat = torch.cat([torch.zeros_like(valid[..., :1]), blocks[..., 1:] == blocks[..., :-1]], dim=-1)
    blocks = torch.where(repeat, sentinel, blocks).sort(dim=-1).values
    return blocks, (blocks < sentinel).sum(dim=-1)


def build_block_index(
    block_size: int,
    local_blocks: Optional[int],
    global_blocks: int,
    random_blocks: int,
    seed: int,
    layout: Optional[Tensor],
    num_heads: int,
    seq_q: int,
    seq_k: int,
    is_causal: bool,
    device: torch.device,
    *,
    transpose: bool = False,
) -> BlockIndex:
    """The ``BlockIndex`` of a call with ``seq_q`` queries (the last positions) over ``seq_k``
    keys. ``layout``, when given, is ``[H or 1, >= Mk, >= Mk]`` bool (checked by the caller);
    ``transpose`` also builds the key-to-query lists the backward needs."""
    # Symbolic-friendly arithmetic (torch.sym_*): under torch.compile the lengths are symbols.
    num_key_blocks = (seq_k + block_size - 1) // block_size
    first_block = (seq_k - seq_q) // block_size
    num_query_blocks = num_key_blocks - first_block if seq_q > 0 else 0
    per_head = random_blocks > 0 or (layout is not None and layout.shape[0] > 1)
    heads = num_heads if per_head else 1
    rows = torch.arange(num_query_blocks, device=device, dtype=torch.int64) + first_block
    dense_rows = torch.sym_max(0, torch.sym_min(global_blocks - first_block, num_query_blocks))

    candidates, width = _candidate_blocks(
        rows, num_key_blocks, heads, local_blocks, global_blocks, random_blocks, seed, is_causal)
    if layout is not None:
        # Rows of the explicit layout, with the other parts set into them: [H', Mq, Mk].
        kept = layout[:, first_block : first_block + num_query_blocks, :num_key_blocks].to(device)
        kept = kept.expand(heads, num_query_blocks, num_key_blocks)
        if width:
            inside = (candidates >= 0) & (candidates < num_key_blocks)
            spare = torch.where(inside, candidates, num_key_blocks)
            padded = torch.zeros(heads, num_query_blocks, num_key_blocks + 1, dtype=torch.bool,
                                 device=device)
            kept = kept | padded.scatter(2, spare, True)[..., :num_key_blocks]
        candidates = torch.arange(num_key_blocks, device=device, dtype=torch.int64)
        candidates = torch.where(kept, candidates, num_key_blocks)
        valid = kept
    else:
        valid = (candidates >= 0) & (candidates < num_key_blocks)
    if is_causal:
        valid = valid & (candidates <= rows.view(1, -1, 1))
    blocks, counts = _sorted_unique(candidates, valid, num_key_blocks)

    # Global rows walk every key block (the causal ones up to their own).
    row_index = torch.arange(num_query_blocks, device=device).view(1, -1)
    dense = row_index < dense_rows
    walk = torch.clamp(rows + 1, max=num_key_blocks) if is_causal else torch.zeros_like(rows) + num_key_blocks
    counts = torch.where(dense, walk.view(1, -1), counts)

    q_ptr = q_indices = None
    if transpose:
        slots = torch.arange(blocks.shape[-1], device=device).view(1, 1, -1)
        listed = (slots < counts.unsqueeze(-1)) & ~dense.unsqueeze(-1)
        end = num_key_blocks * num_query_blocks
        keys = torch.where(listed, blocks * num_query_blocks + row_index.unsqueeze(-1), end)
        keys = keys.flatten(1).sort(dim=-1).values  # [H', Mq * W], by key block then row
        bounds = torch.arange(num_key_blocks + 1, device=device, dtype=torch.int64) * num_query_blocks
        q_ptr = torch.searchsorted(keys, bounds.expand(heads, -1).contiguous()).to(torch.int32)
        q_indices = (keys % max(num_query_blocks, 1)).to(torch.int32)
    return BlockIndex(
        blocks.to(torch.int32), counts.to(torch.int32), q_ptr, q_indices, first_block,
        num_query_blocks, num_key_blocks, dense_rows,
    )


class EagerCache:
    """A small LRU of values built for eager calls. Objects a key names by identity (explicit
    layouts) are held with the value, so their identity cannot be reused while it lives, and a
    hit needs the very same object, unchanged: a tensor's version counter must not have moved
    (an in-place edit builds the value again)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any, held: Any, build: Callable[[], Any]) -> Any:
        """The value of ``key`` (built by ``build()`` on a miss), ``held`` kept alive with it.
        Under tracing the value is built and not kept: it would hold the trace's tensors."""
        if tracing(held if isinstance(held, Tensor) else None):
            return build()
        version = held._version if isinstance(held, Tensor) else None
        hit = self._entries.get(key)
        if hit is not None and hit[0] is held and hit[1] == version:
            self._entries.move_to_end(key)
            return hit[2]
        value = build()
        self._entries[key] = (held, version, value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value


# Eager calls with the same pattern and lengths (every layer of a model, every step of a
# training loop) share one index: building it is a few hundred small tensor ops, whose launch
# overhead alone (~2.5 ms for BigBird) exceeds the kernels' time at 16K tokens.
_INDEX_CACHE_SIZE = 32
_INDEX_CACHE = EagerCache(_INDEX_CACHE_SIZE)


def tracing(t: Tensor | None = None) -> bool:
    """Whether this call is being traced (Dynamo, AOTAutograd, make_fx, export), or ``t``
    belongs to a trace: a dispatch mode is active (fake, functional, proxy), or ``t`` is a fake
    or functional tensor. Values built then are the trace's, never an eager cache's: a
    ``triton_op``'s body, for one, is traced under a functional mode with functional tensors
    that neither ``is_compiling`` nor a proxy mode reveals."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or get_proxy_mode() is not None
        or (t is not None and (isinstance(t, (FakeTensor, FunctionalTensor))
                               or torch._is_functional_tensor(t)))
    )


def cached_block_index(like: Tensor, *arguments, transpose: bool = False) -> BlockIndex:
    """``build_block_index(*arguments, like.device, transpose=transpose)`` (``arguments``: its
    arguments from ``block_size`` to ``is_causal``), served from a small LRU cache in eager mode.

    The key holds every argument, an explicit layout by identity (``EagerCache`` checks its
    version counter: an in-place change to the layout builds a new index, and keeps the layout
    alive so its identity cannot be reused). Under tracing the index is always built, as ops of
    the graph."""
    layout = arguments[5]
    args = (*arguments, like.device)
    if tracing(like) or (layout is not None and tracing(layout)):
        return build_block_index(*args, transpose=transpose)
    key = (*args[:5], None if layout is None else id(layout), *args[6:], transpose)
    return _INDEX_CACHE.get(key, layout, lambda: build_block_index(*args, transpose=transpose))
