"""``export``: ``torch.export`` with the annotated SDPA calls rewritten into the dilated op.

The exported program's graph holds ``torch.ops.dilated_compile.dilated_attention`` where the model
called ``F.scaled_dot_product_attention`` inside ``dilated(...)``; it runs, saves and loads like
any ``ExportedProgram`` (loading needs ``import dilated_compile``, which registers the op), and
``run_decompositions()`` keeps the op unless given its decomposition
(``dilated_compile.ops.decompositions.dilated_attention_decompositions()``). The other targets
(``aot_compile``, ``to_onnx``, ``dilated_compile.tensorrt.compile``) start from such a program.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import TensorArgument

from .ops import annotation_op
from .passes import rewrite_annotated_sdpa

__all__ = ["export"]

# Strict export runs forward under Dynamo, which records the push and pop of the torch-function
# mode stack done by a `with dilated(...)` inside forward as a side effect without a source and
# warns about it, although the stack is restored when the region closes. Only that exact warning
# is silenced: a list holding the single sourceless entry. Side effects of the model itself come
# with a source (e.g. "L['self'].cache") and are still reported. ("While exporting" is the wording
# of older PyTorch releases.)
_MODE_STACK_SIDE_EFFECT = (
    r"While (compiling|exporting), we found certain side effects happened in the model\.forward\. "
    r"Here are the list of potential sources you can double check: \['<unknown source>'\]$"
)


def _check_arguments(module: Any, args: Any, kwargs: Any) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"module must be a torch.nn.Module, got {type(module).__name__}; wrap a function in a "
            "module whose forward calls it"
        )
    if not isinstance(args, tuple):
        raise TypeError(
            f"args must be a tuple of forward's positional arguments, got {type(args).__name__}; "
            "for one tensor x pass (x,)"
        )
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")


def export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = True,
) -> ExportedProgram:
    """Export ``module`` with ``torch.export`` and rewrite its dilated attention into the op.

    Args:
        module: the model; its forward calls ``F.scaled_dot_product_attention`` inside
            ``dilated(...)`` (or the op itself, e.g. through ``dilated_attention``).
        args: forward's positional example inputs, a tuple.
        kwargs: forward's keyword example inputs.
        dynamic_shapes: as for ``torch.export.export``, e.g. a dynamic sequence length with
            ``{"x": {1: torch.export.Dim("seq", max=65536)}}``.
        strict: trace with Dynamo (True) or with Python (False), as in ``torch.export.export``;
            both keep the annotation.

    Returns:
        A ``torch.export.ExportedProgram`` whose graph holds one
        ``torch.ops.dilated_compile.dilated_attention`` node per annotated SDPA call (SDPA calls
        outside ``dilated(...)`` are kept as they are). The rewrites are listed in
        ``program.graph_module.meta["dilated_compile.rewrites"]``.

    Example::

        >>> class Attention(torch.nn.Module):
        ...     def forward(self, q, k, v):          # [B, H, N, D]
        ...         with dilated(segment_lengths=(256, 512), dilation_rates=(1, 2)):
        ...             return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> q = k = v = torch.randn(1, 8, 1000, 64)
        >>> seq = torch.export.Dim("seq", max=65536)
        >>> program = dilated_compile.export(
        ...     Attention(), (q, k, v), dynamic_shapes=({2: seq}, {2: seq}, {2: seq}))
        >>> torch.export.save(program, "attention.pt2")   # torch.export.load needs the import
    """
    _check_arguments(module, args, kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MODE_STACK_SIDE_EFFECT, category=UserWarning)
        program = torch.export.export(
            module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict
        )
    rewrite_annotated_sdpa(program.graph_module)
    _sync_output_names(program)
    program.validate()
    return program


def _sync_output_names(program: ExportedProgram) -> None:
    """Point the graph signature at the nodes the graph now returns: when the model returns an
    attention output directly, the rewrite replaced the node the signature names."""
    (output,) = [node for node in program.graph.nodes if node.op == "output"]
    for spec, value in zip(program.graph_signature.output_specs, output.args[0]):
        if isinstance(spec.arg, TensorArgument) and isinstance(value, torch.fx.Node):
            spec.arg.name = value.name


def as_program(
    module_or_program: torch.nn.Module | ExportedProgram,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
    strict: bool,
    caller: str,
) -> ExportedProgram:
    """The exported program the other targets start from: ``export(...)`` of a module, or a
    given program after checking that its annotations were rewritten."""
    if not isinstance(module_or_program, ExportedProgram):
        return export(module_or_program, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    if dynamic_shapes is not None:
        raise ValueError(
            f"{caller}: dynamic_shapes applies when exporting a module; this ExportedProgram was "
            "exported already (its dynamic dimensions are kept): drop dynamic_shapes, or pass "
            "the module"
        )
    unrewritten = [
        node.name for node in module_or_program.graph.nodes
        if node.op == "call_function" and node.target is annotation_op
    ]
    if unrewritten:
        raise ValueError(
            f"{caller}: the ExportedProgram still holds dilated(...) annotations ({unrewritten}) "
            "that were never rewritten into the dilated op; export with dilated_compile.export(...), "
            "or run dilated_compile.passes.rewrite_annotated_sdpa(program.graph_module) first"
        )
    return module_or_program


def program_device_types(program: ExportedProgram) -> set[str]:
    """Device types of the program's inputs, parameters and buffers."""
    return {
        value.device.type
        for node in program.graph.nodes
        if node.op == "placeholder" and isinstance(value := node.meta.get("val"), torch.Tensor)
    }


_DILATED_OPS = re.compile(r"^dilated_compile::")


def dilated_op_nodes(program: ExportedProgram) -> list[str]:
    """Names of the ``torch.ops.dilated_compile.*`` ops left in a program's graph."""
    return sorted({
        node.target.name() for node in program.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        and _DILATED_OPS.match(node.target.name())
    })
