"""Graph breaks inside ``dilated(...)`` regions: found, and named in a warning.

A graph break inside a region does not lose the annotation: Dynamo keeps torch-function modes
across the break, so SDPA calls on both sides are captured annotated (and rewritten), and the
code at the break runs eagerly with the mode active (computing dilated attention at once). The
break still splits the region into several graphs, which users want to know about, so the
backend warns with the break's location.

Whether a break is inside a region is read from Dynamo's symbolic torch-function mode stack at
the moment the graph before the break is compiled (the backend runs while Dynamo traces).
"""

from __future__ import annotations

import warnings

import torch.fx

from .annotation import AttentionRegion
from .attention_family import describe, family_of_payload


class GraphBreakInDilatedRegionWarning(UserWarning):
    """A ``dilated(...)`` region was split by a graph break (results stay dilated)."""


def _open_regions_at_break() -> list[str]:
    """A description of each ``dilated(...)`` mode on Dynamo's symbolic stack, outermost first."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    state = getattr(tx, "symbolic_torch_function_state", None)
    if state is None:  # not compiling, or a Dynamo without a symbolic mode stack
        return []
    regions = []
    for variable in state.mode_stack:
        mode = getattr(variable, "value", None)
        if isinstance(mode, AttentionRegion):
            regions.append(_describe(tx, variable, mode))
    return regions


def _describe(tx, variable, mode: AttentionRegion) -> str:
    """``dilated(<spec>)`` (or another family's region) for a mode; a mode opened inside the
    traced code is not initialised yet (Dynamo replays its attributes later), so read the payload
    Dynamo recorded for it."""
    if "spec" in vars(mode):
        return describe(mode.spec)
    try:
        payload = tx.output.side_effects.load_attr(variable, "payload").as_python_constant()
        family = family_of_payload(payload)
    except Exception:  # Dynamo internals differ between versions; the location still helps
        return f"{type(mode).__name__}(...)"
    try:
        return describe(family.from_json(payload, None))
    except ValueError:  # a spec with a tensor (a layout) the payload only announces
        return f"{family.region_name}({payload})"


def graph_break_in_region(gm: torch.fx.GraphModule) -> str | None:
    """A description of the graph break that ends ``gm`` when it lies inside a ``dilated(...)``
    region, else None. Call from a backend, while Dynamo is compiling ``gm``."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    regions = _open_regions_at_break()
    if not regions:
        return None
    where = reason.user_stack[-1] if getattr(reason, "user_stack", None) else None
    location = f"{where.filename}:{where.lineno} in {where.name}" if where else "unknown location"
    first_line = str(reason.reason).strip().splitlines()[0] if reason.reason else "graph break"
    return f"graph break inside {regions[-1]} at {location}: {first_line}"


def warn_on_graph_break_in_region(gm: torch.fx.GraphModule) -> str | None:
    """Warn (and count) when ``gm`` ends in a graph break inside a ``dilated(...)`` region."""
    description = graph_break_in_region(gm)
    if description is not None:
        from torch._dynamo.utils import counters

        counters["dilated_compile"]["graph_break_in_region"] += 1
        warnings.warn(
            f"{description}. The region stays dilated: SDPA calls on both sides of the break are "
            "rewritten and the code at the break runs eagerly under the annotation; remove the "
            "break to compile the region as one graph.",
            GraphBreakInDilatedRegionWarning,
            stacklevel=2,
        )
    return description
