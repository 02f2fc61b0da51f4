"""Every rank must make the same sequence-parallel call: checked on every call.

Each call all-gathers a small int64 signature (local lengths, shapes, dtype, a hash of the spec,
flags); any disagreement raises the same ValueError on every rank, naming the field and each
rank's value, instead of a hang or a silent wrong result in a later collective.

The exchange is needed on every call, not only on the first of a class: the global length ``N``
(the sum of the ranks' local lengths) is not a function of one rank's own length (with 13 or 11
positions over 2 zigzag ranks, rank 0 holds 5 either way), so a rank that skipped the exchange
on a cached class could use a wrong ``N`` and desynchronise the collectives that follow. It is
one latency-bound message of ``W * 17 * 8`` bytes (on a GPU group, a host sync: the lengths
decide the shapes). What is cached is the validation of a table already seen.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from .errors import named_collective
from .group import rank_and_size
from .shard import check_lengths

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STRATEGY_CODES = {"auto": 0, "all_gather": 1, "all_to_all": 2, "ring": 3}
_LAYOUT_CODES = {"contiguous": 0, "zigzag": 1}

_CHECKED: dict[tuple, int] = {}


def _crc(text: str) -> int:
    """A hash that is the same in every process (Python's str hash is salted per process)."""
    return zlib.crc32(text.encode())


def signature_fields(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec_json: str, *, is_causal: bool,
    scale: float | None, strategy: str, layout: str, attn_mask: torch.Tensor | None,
) -> dict[str, int]:
    """The call's signature: field -> int64 value (``local length`` may differ across ranks)."""
    mask = attn_mask
    return {
        "local length": q.shape[2],
        "key local length": k.shape[2],
        "batch": q.shape[0],
        "query heads": q.shape[1],
        "key/value heads": k.shape[1],
        "head dim": q.shape[3],
        "value head dim": v.shape[3],
        "dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 99,
        "spec (crc32 of its JSON)": _crc(spec_json),
        "is_causal": int(bool(is_causal)),
        "scale (crc32)": _crc(repr(scale)),
        "strategy": _STRATEGY_CODES[strategy],
        "layout": _LAYOUT_CODES[layout],
        "attn_mask present": int(mask is not None),
        "attn_mask dtype": -1 if mask is None else int(mask.dtype == torch.bool),
        "attn_mask key length": -1 if mask is None else mask.shape[-1],
    }


_NUM_FIELDS = 16


def check_signature(
    group: dist.ProcessGroup, fields: dict[str, int] | None, local_error: Exception | None,
    key: Any, device: Any = "cpu",
) -> int:
    """The global length ``N`` of a call whose signature is ``fields``; ValueError, the same on
    every rank, when the ranks disagree (one small all-gather on ``device``, the collectives'
    device: CPU for gloo, the current GPU for NCCL).

    A rank whose own call is invalid (``local_error``, ``fields`` None) still joins the
    all-gather: it re-raises its error, the others raise a ValueError naming it."""
    rank, world = rank_and_size(group)
    values = [0] * _NUM_FIELDS if fields is None else list(fields.values())
    mine = torch.tensor([int(local_error is not None), *values], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    with named_collective("sequence_parallel: the signature check (an all-gather of every rank's "
                          "call signature, before each attention call)", group):
        dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()  # [W, 1 + fields]
    cache_key = (id(group), key, tuple(table.flatten().tolist()))
    if cache_key in _CHECKED:
        return _CHECKED[cache_key]
    invalid = [r for r in range(world) if table[r, 0]]
    if local_error is not None:
        raise local_error
    if invalid:
        raise ValueError(
            f"sequence_parallel: rank(s) {invalid} made an invalid attention call (their error "
            "says why); every rank must make the same call"
        )
    table = table[:, 1:]
    names = list(fields)
    local = table[:, names.index("local length")].tolist()
    for column, name in enumerate(names):
        if name in ("local length", "key local length"):
            continue
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            if name == "dtype":
                values = [str(_DTYPES[v]) if v < len(_DTYPES) else "unsupported" for v in values]
            elif name == "strategy" or name == "layout":
                codes = _STRATEGY_CODES if name == "strategy" else _LAYOUT_CODES
                values = [next(k for k, c in codes.items() if c == v) for v in values]
            raise ValueError(
                f"sequence_parallel: the ranks disagree on {name}: {_per_rank(values)}; every rank "
                "must make the same attention call on its shard of one sequence"
            )
    keys = table[:, names.index("key local length")].tolist()
    if keys != local:
        raise ValueError(
            f"sequence_parallel: query and key/value shards differ in length (queries "
            f"{_per_rank(local)}, keys {_per_rank(keys)}); sequence-parallel attention is "
            "self-attention over one sharded sequence (no KV cache)"
        )
    layout = next(name for name, code in _LAYOUT_CODES.items() if code == fields["layout"])
    check_lengths(local, layout)
    n = sum(local)
    if fields["attn_mask key length"] not in (-1, n):
        raise ValueError(
            f"sequence_parallel: attn_mask must cover every key of the sequence, its last dim "
            f"{fields['attn_mask key length']} != N = {n} ([B or 1, H or 1, local length or 1, N])"
        )
    if len(_CHECKED) > 4096:  # many lengths (generation): keep the cache bounded
        _CHECKED.clear()
    _CHECKED[cache_key] = n
    return n


def _per_rank(values: list[Any]) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
