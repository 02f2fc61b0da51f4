"""Annotations: mark the SDPA calls that compute a sparse attention family.

Users keep writing ``F.scaled_dot_product_attention``; inside a region of a family —
``dilated(...)`` here, ``block_sparse(...)`` in ``block_sparse_annotation`` — (a context manager
and a decorator) every such call computes that family's attention:

- in eager mode the call runs the family's exact op at once;
- under ``torch.compile``/``torch.export`` the call is captured as the plain SDPA node followed
  by an ``annotation`` node that holds the spec; the ``"dilated_compile"`` backend's rewrite pass
  turns the pair into the family's op (see ``dilated_compile.ops.annotation``).

Both paths give the same numbers. Nothing is silently dropped: SDPA arguments the op cannot honour
raise, attention entry points that bypass SDPA raise, and an unrewritten annotation raises when
the graph runs. ``AttentionRegion`` holds the machinery; a family subclasses it and registers an
``AttentionFamily`` (``attention_family``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .attention_family import AttentionFamily, describe, family_of_spec, register_family
from .ops import annotation_op, dilated_attention_op
from .ops._checks import (
    check_attention_inputs,
    check_attn_mask,
    check_attn_mask_grad,
    check_sdpa_mask_and_causal,
)
from .spec import DilatedSpec

_F = TypeVar("_F", bound=Callable[..., Any])

# F.scaled_dot_product_attention's parameters and defaults (scale and enable_gqa keyword-only).
SDPA_DEFAULTS = {
    "attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False,
}
_SDPA_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")

# Attention paths that never reach F.scaled_dot_product_attention inside this mode (the mode is
# suspended while a Python-level torch function runs), so they would silently stay dense.
_BYPASSING_ATTENTION = {
    F.multi_head_attention_forward: "F.multi_head_attention_forward (nn.MultiheadAttention)",
    torch._native_multi_head_attention: "torch._native_multi_head_attention (nn.MultiheadAttention)",
}


def resolve_spec(
    spec: DilatedSpec | None,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    mode: str,
) -> DilatedSpec:
    """A ``DilatedSpec`` from either a spec or its fields (not both)."""
    if spec is not None:
        if segment_lengths is not None or dilation_rates is not None or mode != "mixture":
            raise TypeError(
                "pass either spec or segment_lengths/dilation_rates/mode, not both; got spec "
                f"{spec!r} and segment_lengths={segment_lengths!r}, "
                f"dilation_rates={dilation_rates!r}, mode={mode!r}"
            )
        if not isinstance(spec, DilatedSpec):
            raise TypeError(f"spec must be a DilatedSpec, got {type(spec).__name__}: {spec!r}")
        return spec
    if segment_lengths is None or dilation_rates is None:
        raise TypeError(
            "dilated attention needs a pattern: pass spec=DilatedSpec(...) or both "
            "segment_lengths=... and dilation_rates=..."
        )
    return DilatedSpec(segment_lengths, dilation_rates, mode)


def bind_sdpa_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """An SDPA call's arguments by name, defaults filled in (for calls and for FX nodes)."""
    if len(args) > len(_SDPA_POSITIONAL):
        raise TypeError(
            f"scaled_dot_product_attention takes at most 6 positional arguments, got {len(args)}"
        )
    bound = dict(zip(_SDPA_POSITIONAL, args))
    for name, value in kwargs.items():
        if name not in _SDPA_POSITIONAL and name not in SDPA_DEFAULTS:
            raise TypeError(f"scaled_dot_product_attention got an unexpected argument {name!r}")
        if name in bound:
            raise TypeError(f"scaled_dot_product_attention got multiple values for {name!r}")
        bound[name] = value
    for name in ("query", "key", "value"):
        if name not in bound:
            raise TypeError(f"scaled_dot_product_attention is missing the argument {name!r}")
    return {**SDPA_DEFAULTS, **bound}


def check_unsupported_sdpa_arguments(spec: Any, dropout_p: Any) -> None:
    """Raise for SDPA arguments no family's op can honour (they would otherwise be ignored)."""
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout_p={dropout_p} is not supported inside {describe(spec)}: pass dropout_p=0.0 "
            "(for modules, call model.eval() or set their attention dropout to 0)."
        )


def check_causal_alignment(query: torch.Tensor, key: torch.Tensor, is_causal: Any) -> None:
    """Refuse ``is_causal=True`` with fewer queries than keys at the SDPA boundary: SDPA aligns
    its causal mask to the top-left there, the KV-cache convention (queries are the last
    positions) to the bottom-right; either reading would surprise someone."""
    if is_causal and query.shape[2] < key.shape[2]:
        raise ValueError(
            f"is_causal=True with query seq_len {query.shape[2]} < key seq_len {key.shape[2]} is "
            "ambiguous (SDPA aligns the causal mask top-left, a KV cache needs it bottom-right). "
            "Pass is_causal=False with an explicit attn_mask, or is_causal=False alone when "
            "decoding one token against a cache (the queries are the last positions, so they "
            "see no future key)."
        )


def check_sdpa_arguments(spec: Any, arguments: dict[str, Any]) -> None:
    """Raise for SDPA arguments of a call inside a region of ``spec`` that cannot be honoured."""
    check_unsupported_sdpa_arguments(spec, arguments["dropout_p"])
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    check_attention_inputs(query, key, value, enable_gqa=bool(arguments["enable_gqa"]))
    check_attn_mask(arguments["attn_mask"], query, key)
    check_sdpa_mask_and_causal(arguments["attn_mask"], bool(arguments["is_causal"]))
    check_attn_mask_grad(arguments["attn_mask"])
    check_causal_alignment(query, key, arguments["is_causal"])
    family_of_spec(spec).check(spec, query, key)


# Hooks that may take over a region's SDPA call, ``(spec, arguments) -> Tensor | None`` (None:
# decline). ``sequence_parallel`` registers one while a context is open.
SDPA_CALL_HOOKS: list[Callable[[Any, dict[str, Any]], torch.Tensor | None]] = []


def annotated_sdpa(spec: Any, payload: str, arguments: dict[str, Any]) -> torch.Tensor:
    """One SDPA call inside a region of ``spec``: the family's attention now, or its annotated
    capture (or what a hook of ``SDPA_CALL_HOOKS`` computes)."""
    for hook in SDPA_CALL_HOOKS:
        result = hook(spec, arguments)
        if result is not None:
            return result
    check_sdpa_arguments(spec, arguments)
    family = family_of_spec(spec)
    tensor = family.spec_tensor(spec)
    if torch.compiler.is_compiling():
        return capture_annotated_sdpa(arguments, payload, tensor)
    out, _ = family.op(
        arguments["query"], arguments["key"], arguments["value"],
        *family.pattern_args(spec, tensor), bool(arguments["is_causal"]), arguments["scale"],
        arguments["attn_mask"],
    )
    return out


def capture_annotated_sdpa(
    arguments: dict[str, Any], payload: str, tensor: torch.Tensor | None, *,
    mask_on_annotation: bool = False,
) -> torch.Tensor:
    """An annotated SDPA call as ``torch.compile``/``torch.export`` capture it: the plain SDPA
    node and the ``annotation`` node that marks it (``dilated_compile.ops.annotation``).
    ``mask_on_annotation``: the mask goes on the annotation node instead of the SDPA node (a
    mask over keys the SDPA node does not hold, as inside ``sequence_parallel``)."""
    attn_mask = arguments["attn_mask"]
    # Disabled torch functions: an enclosing region must not re-annotate this call, so the
    # innermost annotation wins, as it does in eager mode.
    with torch._C.DisableTorchFunction():
        sdpa_out = F.scaled_dot_product_attention(
            arguments["query"], arguments["key"], arguments["value"],
            attn_mask=None if mask_on_annotation else attn_mask, dropout_p=0.0,
            is_causal=bool(arguments["is_causal"]), scale=arguments["scale"],
            enable_gqa=bool(arguments["enable_gqa"]),
        )
        if mask_on_annotation and attn_mask is not None:
            return annotation_op(sdpa_out, payload, tensor, attn_mask)
        return annotation_op(sdpa_out, payload, tensor)


class AttentionRegion(TorchFunctionMode):
    """A region in which every ``F.scaled_dot_product_attention`` call computes the attention of
    ``spec``'s family (a context manager and a decorator). Families subclass it (``dilated``,
    ``block_sparse``); regions of any families nest, and the innermost wins."""

    def __init__(self, spec: Any) -> None:
        super().__init__()
        family_of_spec(spec)  # a registered family's spec
        self.spec = spec
        # A plain string attribute: what Dynamo records for a mode opened inside traced code,
        # and what the graph-break warning reads back (dilated_compile.graph_breaks).
        self.payload = self.spec.to_json()

    def __repr__(self) -> str:
        return describe(self.spec)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return annotated_sdpa(self.spec, self.payload, bind_sdpa_arguments(args, kwargs))
        if func in _BYPASSING_ATTENTION:
            raise NotImplementedError(
                f"{_BYPASSING_ATTENTION[func]} does not go through F.scaled_dot_product_attention, "
                f"so it cannot honour {self!r}. Call F.scaled_dot_product_attention directly "
                "inside the region (or use it outside the region for dense attention)."
            )
        return func(*args, **kwargs)

    def __call__(self, fn: _F) -> _F:
        if not callable(fn):
            raise TypeError(f"{type(self).__name__}(...) decorates a function, got {type(fn).__name__}")
        spec, region = self.spec, type(self)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # A fresh mode per call: a mode instance cannot be on the stack twice (recursion).
            with region(spec):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


class dilated(AttentionRegion):
    """Compute dilated attention for every ``F.scaled_dot_product_attention`` call inside.

    A context manager and a decorator. Give either a ``DilatedSpec`` or its fields.

    Args:
        spec: the pattern; or
        segment_lengths, dilation_rates, mode: the fields of a ``DilatedSpec``.

    Inside the region, SDPA calls take the usual ``[B, H, N, D]`` tensors (``enable_gqa=True``
    for fewer key/value heads) and honour ``attn_mask`` (bool, True = keep, or float, added to
    the scores; applied on top of the dilated pattern), ``is_causal`` and ``scale``. The query
    may be shorter than the keys (a KV cache): query ``i`` then stands at position
    ``Nk - Nq + i``, so decoding against a cache gives the rows of the full forward; there
    ``is_causal=True`` raises (SDPA's top-left alignment would differ), pass a mask instead.
    ``dropout_p > 0`` and a mask that requires grad raise ``NotImplementedError``. Regions
    nest; the innermost wins. Eager mode and ``torch.compile(backend="dilated_compile")`` give
    the same numbers. A graph break inside a region keeps the annotation (the pieces on both
    sides are still rewritten) and warns with the break's location.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> from dilated_compile import dilated
        >>> q = k = v = torch.randn(1, 4, 96, 16)
        >>> with dilated(segment_lengths=(32, 64), dilation_rates=(1, 2)):
        ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> @dilated(segment_lengths=(32, 64), dilation_rates=(1, 2))
        ... def attend(q, k, v):
        ...     return F.scaled_dot_product_attention(q, k, v)
    """

    def __init__(
        self,
        spec: DilatedSpec | None = None,
        *,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        mode: str = "mixture",
    ) -> None:
        super().__init__(resolve_spec(spec, segment_lengths, dilation_rates, mode))


def _check_dilated(spec: DilatedSpec, query: torch.Tensor, key: torch.Tensor) -> None:
    spec.check_num_heads(query.shape[1])


register_family(AttentionFamily(
    kind="dilated",
    region_name="dilated",
    spec_type=DilatedSpec,
    op=dilated_attention_op,
    op_name="dilated_compile.dilated_attention",
    pattern_args=lambda spec, tensor: (list(spec.segment_lengths), list(spec.dilation_rates), spec.mode),
    spec_tensor=lambda spec: None,
    from_json=lambda payload, tensor: DilatedSpec.from_json(payload),
    check=_check_dilated,
    region=dilated,
))
