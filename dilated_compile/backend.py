"""The ``"dilated_compile"`` torch.compile backend and ``dilated_compile.compile``.

The backend runs the library's graph passes on the graph Dynamo captured (rewriting annotated
SDPA calls into the dilated op), then hands it to Inductor with the usual ``mode``/``options``.
Because the rewrite happens before Inductor, the spec is an argument of an op in the graph that
Inductor sees, so Inductor's and AOTAutograd's caches key on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch._dynamo.backends.registry import lookup_backend, register_backend

from .graph_breaks import warn_on_graph_break_in_region
from .passes import rewrite_annotated_sdpa


def run_passes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The library's passes on a Dynamo graph, in order."""
    warn_on_graph_break_in_region(gm)
    return rewrite_annotated_sdpa(gm)


@register_backend(name="dilated_compile")
def dilated_compile_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """``torch.compile(fn, backend="dilated_compile", mode=..., options=...)``: rewrite, then
    Inductor (``mode``/``options`` mean what they mean for the default backend)."""
    gm = run_passes(gm)
    inductor = torch._TorchCompileInductorWrapper(mode, options, dynamic=None)
    return inductor(gm, example_inputs)


@register_backend(name="dilated_compile_aot_eager", tags=("debug",))
def dilated_compile_aot_eager_backend(
    gm: torch.fx.GraphModule, example_inputs: list[Any]
) -> Callable[..., Any]:
    """Debugging twin of ``"dilated_compile"``: same passes, then AOTAutograd with eager kernels
    (no Inductor), like PyTorch's ``"aot_eager"``. Faster to compile; same numbers."""
    return lookup_backend("aot_eager")(run_passes(gm), example_inputs)


def compile(model: Callable[..., Any] | None = None, **torch_compile_kwargs: Any) -> Any:
    """``torch.compile(model, backend="dilated_compile", **torch_compile_kwargs)``.

    Takes every ``torch.compile`` keyword (``fullgraph``, ``dynamic``, ``mode``, ``options``,
    ...) except ``backend``. Works as a decorator too.

    Example::

        >>> model = dilated_compile.compile(model, dynamic=True)
    """
    if "backend" in torch_compile_kwargs:
        raise TypeError(
            "dilated_compile.compile always uses backend='dilated_compile'; call "
            f"torch.compile(..., backend={torch_compile_kwargs['backend']!r}) for another backend"
        )
    return torch.compile(model, backend="dilated_compile", **torch_compile_kwargs)
