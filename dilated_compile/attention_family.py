"""Attention families: what the annotation, the rewrite pass and ``apply`` need of each.

A family (dilated, block-sparse, ...) is one spec type, one annotation (a region), one op. The
machinery that turns an annotated SDPA call into the family's op — in eager mode, in a captured
graph, through export — is written once against this description, so a new family registers
itself instead of copying it.

Every family's op takes ``(q, k, v, *pattern, is_causal, scale, attn_mask)`` and returns
``(out, lse)`` (or ``out`` alone, ``returns_lse=False``); ``pattern`` are the spec's fields as op
arguments. A family may carry one tensor with its spec (a block-sparse layout): it travels beside
the JSON payload as a graph input, never inside it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class AttentionFamily:
    """How one attention family is annotated, checked and called.

    Attributes:
        kind: the ``"kind"`` of its JSON payloads.
        region_name: the annotation's name, for messages (``"dilated"``).
        spec_type: its spec class.
        op: its op overload, ``(q, k, v, *pattern, is_causal, scale, attn_mask) -> (out, lse)``.
        op_name: the op's name in reports (``"dilated_compile.dilated_attention"``).
        pattern_args: ``(spec, tensor) -> tuple``: the op's pattern arguments; ``tensor`` stands
            for the spec's tensor (the tensor itself, or its node in a graph).
        spec_tensor: ``spec -> Tensor | None``: the tensor the spec carries.
        from_json: ``(payload, tensor) -> spec``.
        check: ``(spec, query, key) -> None``: raise for inputs the spec cannot serve (heads,
            lengths), naming the fix.
        region: its annotation class, ``region(spec)`` a fresh region (what ``apply`` opens).
        returns_lse: whether ``op`` returns ``(out, lse)`` (else ``out`` alone).
        user_spec: whether users hand this spec to modules and ``apply`` (listed in messages);
            False for a spec the library builds itself (a sequence-parallel call's).
    """

    kind: str
    region_name: str
    spec_type: type
    op: Any
    op_name: str
    pattern_args: Callable[[Any, Any], tuple]
    spec_tensor: Callable[[Any], torch.Tensor | None]
    from_json: Callable[[str, Any], Any]
    check: Callable[[Any, torch.Tensor, torch.Tensor], None]
    region: Callable[[Any], Any]
    returns_lse: bool = True
    user_spec: bool = True


_BY_KIND: dict[str, AttentionFamily] = {}
_BY_SPEC: dict[type, AttentionFamily] = {}


def register_family(family: AttentionFamily) -> None:
    """Make a family known to the annotation machinery, the rewrite pass and ``apply``."""
    _BY_KIND[family.kind] = family
    _BY_SPEC[family.spec_type] = family


def family_of_spec(spec: Any) -> AttentionFamily:
    """The family of a spec object; TypeError naming the known spec types otherwise."""
    for cls in type(spec).__mro__:
        if cls in _BY_SPEC:
            return _BY_SPEC[cls]
    known = ", ".join(spec_type_names())
    raise TypeError(f"not an attention spec ({known}): {type(spec).__name__}: {spec!r}")


def family_of_payload(payload: str) -> AttentionFamily:
    """The family an annotation payload belongs to (its ``"kind"``)."""
    kind = json.loads(payload).get("kind")
    if kind not in _BY_KIND:
        raise ValueError(
            f"unknown attention annotation kind {kind!r} in {payload!r} (known: {sorted(_BY_KIND)})"
        )
    return _BY_KIND[kind]


def spec_type_names() -> list[str]:
    """The spec class names of the registered families users write specs of, sorted (for
    messages)."""
    return sorted(cls.__name__ for cls, family in _BY_SPEC.items() if family.user_spec)


def describe(spec: Any) -> str:
    """``region_name(spec)``, e.g. ``dilated(DilatedSpec(...))``, for messages."""
    return f"{family_of_spec(spec).region_name}({spec})"
