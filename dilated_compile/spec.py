"""``DilatedSpec``: which dilated-attention pattern to compute.

A spec is a list of configs ``(w_i, r_i)`` (segment length, dilation rate) and a mode that says
how heads use them. It is frozen and hashable, so it can key caches and live in compiled graphs,
and it is validated once, here, so every later layer can trust it.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Iterator, Sequence

MODES = ("mixture", "head_groups")


def _as_int_tuple(field: str, values: object) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"DilatedSpec: {field} must be a sequence of positive ints, got {values!r}"
        )
    out = []
    for value in values:
        # bool is an Integral, but True as a segment length is a bug, not a 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"DilatedSpec: {field} must hold ints, got {value!r} in {values!r}"
            )
        if value < 1:
            raise ValueError(
                f"DilatedSpec: {field} must be positive, got {int(value)} in {tuple(values)!r}"
            )
        out.append(int(value))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class DilatedSpec:
    """The dilated-attention pattern of LongNet (Ding et al., 2023).

    Args:
        segment_lengths: ``w_i`` per config. On a sequence of length ``N`` the effective segment
            length is ``min(w_i, N)``; the last segment may be shorter.
        dilation_rates: ``r_i`` per config, ``1 <= r_i <= w_i``. A query and a key attend under
            config ``i`` when they share a segment and both local indices are congruent to the
            head's offset modulo ``r_i``.
        mode: ``"mixture"`` (LongNet eq. 10, the default): every head uses every config, head
            ``h`` with offset ``h mod r_i``, and configs are mixed by their softmax denominators.
            ``"head_groups"``: heads are split into ``len(configs)`` contiguous groups (the first
            ``H mod G`` one head larger); group ``g`` uses config ``g`` with offset ``g mod r_g``.

    Raises:
        ValueError: naming the field and the value, when the spec is malformed.

    Example::

        >>> spec = DilatedSpec(segment_lengths=(2048, 4096), dilation_rates=(1, 2))
        >>> spec.configs
        ((2048, 1), (4096, 2))
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mode: str = "mixture"

    def __post_init__(self) -> None:
        segment_lengths = _as_int_tuple("segment_lengths", self.segment_lengths)
        dilation_rates = _as_int_tuple("dilation_rates", self.dilation_rates)
        if not segment_lengths:
            raise ValueError("DilatedSpec: segment_lengths must hold at least one config, got ()")
        if len(segment_lengths) != len(dilation_rates):
            raise ValueError(
                "DilatedSpec: segment_lengths and dilation_rates must have one entry per config, "
                f"got {len(segment_lengths)} segment_lengths {segment_lengths} and "
                f"{len(dilation_rates)} dilation_rates {dilation_rates}"
            )
        for w, r in zip(segment_lengths, dilation_rates):
            if r > w:
                raise ValueError(
                    f"DilatedSpec: dilation_rates must not exceed their segment length, got "
                    f"dilation rate {r} for segment length {w} (a segment of {w} positions has "
                    f"at most {w} offsets)"
                )
        if self.mode not in MODES:
            raise ValueError(f"DilatedSpec: mode must be one of {MODES}, got {self.mode!r}")
        # Frozen dataclass: normalise the fields in place (lists become tuples, numpy ints ints).
        object.__setattr__(self, "segment_lengths", segment_lengths)
        object.__setattr__(self, "dilation_rates", dilation_rates)
        # Formatted once, here: under torch.compile(dynamic=True) the ints of a spec made outside
        # the compiled code are traced as symbols, which cannot be formatted into a string.
        object.__setattr__(self, "_json", self._format_json())

    @property
    def configs(self) -> tuple[tuple[int, int], ...]:
        """The ``(segment_length, dilation_rate)`` pairs, in order."""
        return tuple(zip(self.segment_lengths, self.dilation_rates))

    @property
    def num_configs(self) -> int:
        return len(self.segment_lengths)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.configs)

    def check_num_heads(self, num_heads: int, argument: str = "query") -> None:
        """Raise ValueError when ``num_heads`` cannot hold this spec (``head_groups`` needs
        at least one head per config)."""
        if self.mode == "head_groups" and num_heads < self.num_configs:
            raise ValueError(
                f"mode='head_groups' needs at least one {argument} head per config: got "
                f"{num_heads} heads for {self.num_configs} configs {self.configs}; use fewer "
                "configs, more heads, or mode='mixture'"
            )

    # The annotation payload: a JSON string, so it can sit in FX graphs as a plain op argument,
    # survive serialisation, and enter every compiled-artifact cache key. Formatted by hand (equal
    # to json.dumps(..., sort_keys=True)) because torch.compile traces this when a region is
    # opened inside a compiled function, and it cannot trace the json module.
    def to_json(self) -> str:
        return self._json

    def _format_json(self) -> str:
        def ints(values: tuple[int, ...]) -> str:
            return "[" + ", ".join([str(v) for v in values]) + "]"

        return (
            '{"dilation_rates": ' + ints(self.dilation_rates) + ', "kind": "dilated", "mode": "'
            + self.mode + '", "segment_lengths": ' + ints(self.segment_lengths) + "}"
        )

    @classmethod
    def from_json(cls, payload: str) -> DilatedSpec:
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("kind") != "dilated":
            raise ValueError(f"not a dilated-attention annotation: {payload!r}")
        return cls(data["segment_lengths"], data["dilation_rates"], data["mode"])
