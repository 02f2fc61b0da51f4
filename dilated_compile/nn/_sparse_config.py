"""``spec_from_sparse_config``: the ``BlockSparseSpec`` of an earlier port's ``sparse_config``.

Earlier PyTorch ports of LongNet built their block-sparse modules (``BlockSparseRing...``,
factory kind ``"block_sparse_ring"``) from a ``SparsePatternConfig(pattern_type, block_size,
window_size, global_tokens, sparsity_ratio, ...)``. Two of its patterns are block patterns that a
``BlockSparseSpec`` states exactly; this module translates those and refuses the rest, naming the
field and the reason. The rules follow what the ports' pattern generators computed (query block
``i``, key block ``j``, ``M`` blocks):

- ``"local_window"``: ``j`` with ``|i - j| <= (window_size // block_size) // 2``, i.e.
  ``local_blocks = window_size // (2 * block_size)``. The band covers ``2 * local_blocks + 1``
  blocks, which is ``window_size`` only when it is an odd multiple of ``block_size``; for any
  other window it is the band the ports computed (``window_size=256, block_size=64``: 5 blocks).
- ``"global_local"``: that band plus the first ``g`` blocks global in both directions (every
  query block attends them, they attend every key block). The ports' ring modules made the
  first ``global_tokens`` *blocks* global; the field's name says tokens, i.e.
  ``ceil(global_tokens / block_size)`` blocks. The two readings agree for ``global_tokens`` 0
  or 1 (or ``block_size`` 1), which translate; other values raise ``ValueError``.
- ``"dilated_sparse"`` and the ratio-driven or learned patterns raise ``NotImplementedError``.

``sparsity_ratio`` does not enter the two translated patterns (the ports' generators never read
it for them), so it is not read.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from ..block_sparse_spec import BlockSparseSpec

_TRANSLATED = ("local_window", "global_local")
# Patterns of the earlier ports that no spec states exactly.
_UNDEFINED = {
    "dilated_sparse": (
        "its blocks come from dilation offsets that differ between the ports' revisions (the "
        "config's or the module's dilation rates, the first three of them, one or both sides, a "
        "distance cut-off) and, where a sparsity_ratio drives them, from a density rather than "
        "a rule"
    ),
    "adaptive": "its blocks are chosen at run time from a sparsity_ratio (a density, not a rule)",
    "learned": "its blocks are learned during training",
    "hierarchical": "its levels and their block choice differ between the ports' revisions",
}
_MISSING = object()


def spec_from_sparse_config(sparse_config: Any) -> BlockSparseSpec:
    """The ``BlockSparseSpec`` that computes an earlier port's ``sparse_config`` pattern.

    Args:
        sparse_config: the earlier port's ``SparsePatternConfig`` (any object with its fields)
            or a dict of them: ``pattern_type``, ``block_size``, ``window_size`` (or
            ``local_window_size``, its name in some revisions), ``global_tokens``.

    Returns:
        ``BlockSparseSpec(block_size, local_blocks=window_size // (2 * block_size),
        global_blocks=...)`` (see the module docstring for the exact rules).

    Raises:
        NotImplementedError: for ``"dilated_sparse"`` and the ratio-driven or learned patterns,
            which are not defined exactly; pointing to ``BlockSparseSpec(random_blocks=...,
            seed=...)``, an explicit ``layout``, or ``DilatedSpec``.
        ValueError: naming the field, for a value that does not translate exactly.
        TypeError: for a missing field.

    Example::

        >>> spec_from_sparse_config(SparsePatternConfig(pattern_type="local_window", block_size=64,
        ...                                             window_size=256))
        BlockSparseSpec(block_size=64, local_blocks=2)
        >>> spec_from_sparse_config({"pattern_type": "global_local", "block_size": 64,
        ...                          "window_size": 192, "global_tokens": 1})
        BlockSparseSpec(block_size=64, local_blocks=1, global_blocks=1)
    """
    pattern_type = _field(sparse_config, "pattern_type")
    if pattern_type in _UNDEFINED:
        raise NotImplementedError(
            f"sparse_config.pattern_type={pattern_type!r} has no exact equivalent here: "
            f"{_UNDEFINED[pattern_type]}. Choose the pattern explicitly: "
            "spec=BlockSparseSpec(block_size, local_blocks=..., global_blocks=..., "
            "random_blocks=..., seed=...) for random blocks (the same on every device and run), "
            "BlockSparseSpec(block_size, local_blocks=None, layout=...) for a fixed block layout, "
            "or LongNet's dilated attention with spec=DilatedSpec(segment_lengths, dilation_rates)."
        )
    if pattern_type not in _TRANSLATED:
        raise ValueError(
            f"sparse_config.pattern_type must be one of {_TRANSLATED} (translated exactly) or "
            f"{tuple(_UNDEFINED)} (refused: not defined exactly), got {pattern_type!r}"
        )
    block_size = _int_field(sparse_config, "block_size", 1)
    local_blocks = _window(sparse_config) // (2 * block_size)
    if pattern_type == "local_window":
        return BlockSparseSpec(block_size, local_blocks=local_blocks)
    return BlockSparseSpec(
        block_size, local_blocks=local_blocks, global_blocks=_global_blocks(sparse_config, block_size)
    )


def _field(config: Any, name: str, default: Any = _MISSING) -> Any:
    """A field of a config object or mapping; TypeError naming it when missing."""
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    if value is _MISSING:
        raise TypeError(
            f"sparse_config has no field {name!r}: pass the earlier port's SparsePatternConfig or a "
            f"dict with pattern_type, block_size, window_size and global_tokens (got "
            f"{type(config).__name__})"
        )
    return value


def _int_field(config: Any, name: str, minimum: int) -> int:
    value = _field(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"sparse_config.{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _window_name(config: Any) -> str:
    """``window_size``, or ``local_window_size`` in the revisions that call it so."""
    if _field(config, "window_size", None) is None and _field(config, "local_window_size", None) is not None:
        return "local_window_size"
    return "window_size"


def _window(config: Any) -> int:
    return _int_field(config, _window_name(config), 0)


def _global_blocks(config: Any, block_size: int) -> int:
    """The number of global blocks, where the two readings of ``global_tokens`` agree."""
    if _window_name(config) == "local_window_size":
        raise NotImplementedError(
            "sparse_config.pattern_type='global_local' from a config with local_window_size (the "
            "revision whose global blocks are attended by every query but attend only the band "
            "themselves, global_tokens // block_size of them) has no BlockSparseSpec field: its "
            "global blocks go both ways. Pass spec=BlockSparseSpec(block_size, local_blocks=None, "
            "layout=...) with that layout, or use pattern_type='local_window'."
        )
    tokens = _int_field(config, "global_tokens", 0)
    as_tokens = math.ceil(tokens / block_size)
    if as_tokens != tokens:
        raise ValueError(
            f"sparse_config.global_tokens={tokens} does not translate exactly: the earlier port's "
            f"block-sparse ring modules made the first global_tokens blocks global ({tokens} "
            f"blocks), while the name says tokens (ceil({tokens} / {block_size}) = {as_tokens} "
            "blocks of block_size). The readings agree only for global_tokens 0 or 1. Say which "
            f"you mean: spec=BlockSparseSpec({block_size}, local_blocks="
            f"{_window(config) // (2 * block_size)}, global_blocks=...)."
        )
    return tokens
