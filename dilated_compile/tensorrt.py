"""Torch-TensorRT: ``dilated_compile.tensorrt.compile`` builds a TensorRT engine for a model.

TensorRT has no kernel for the dilated op, so ``lower`` replaces it by its decomposition into
aten ops and brings the graph to core ATen; every op of the decomposition has a Torch-TensorRT
converter (``CONVERTED_OPS`` lists them; the test suite checks the lowered graph against it on
CPU), so the attention becomes part of the engine rather than a PyTorch fallback. ``compile``
then hands the lowered program to ``torch_tensorrt.dynamo.compile``.

Needs a CUDA machine with TensorRT: ``pip install "dilated-compile[tensorrt]"`` (the
``torch-tensorrt`` build that matches your PyTorch). See docs/export.md.
"""

from __future__ import annotations

import importlib
import operator
from typing import Any

import torch
from torch.export import ExportedProgram

from .export import as_program, dilated_op_nodes
from .ops.decompositions import dilated_attention_decompositions

__all__ = ["CONVERTED_OPS", "compile", "lower"]

_aten = torch.ops.aten

#: The ops that the lowered dilated attention is made of, each with a Torch-TensorRT dynamo
#: converter (torch_tensorrt/dynamo/conversion/aten_ops_converters.py; the symbolic-size
#: arithmetic is converted too, but not a subtraction of sizes, which the decomposition avoids).
CONVERTED_OPS = frozenset({
    operator.add, operator.mul, operator.floordiv, operator.getitem,
    _aten.add.Tensor, _aten.amax.default, _aten.arange.start_step, _aten.bitwise_and.Tensor,
    _aten.bmm.default, _aten.cat.default, _aten.clone.default, _aten.constant_pad_nd.default,
    _aten.div.Tensor, _aten.eq.Scalar, _aten.eq.Tensor, _aten.exp.default, _aten.expand.default,
    _aten.ge.Scalar, _aten.ge.Tensor, _aten.gt.Scalar, _aten.index_select.default,
    _aten.log.default, _aten.lt.Scalar, _aten.mul.Tensor, _aten.permute.default,
    _aten.scalar_tensor.default, _aten.select.int, _aten.slice.Tensor, _aten.squeeze.dims,
    _aten.sub.Tensor, _aten.sum.dim_IntList, _aten.sym_size.int, _aten.unsqueeze.default,
    _aten.view.default, _aten.where.self, _aten._to_copy.default,
})


def _import_torch_tensorrt() -> Any:
    try:
        return importlib.import_module("torch_tensorrt")
    except ImportError as error:
        raise ImportError(
            "dilated_compile.tensorrt.compile needs Torch-TensorRT, which is not installed: "
            'pip install "dilated-compile[tensorrt]" on a CUDA machine with TensorRT (choose the '
            "torch-tensorrt release built for your PyTorch); dilated_compile.tensorrt.lower "
            "works without it"
        ) from error


def lower(
    module_or_program: torch.nn.Module | ExportedProgram,
    args: tuple[Any, ...],
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    strict: bool = True,
) -> ExportedProgram:
    """The program ``compile`` hands to Torch-TensorRT: the dilated ops decomposed, core ATen.

    Needs no TensorRT (runs on CPU), so the lowering can be checked anywhere.

    Args:
        module_or_program, args, kwargs, dynamic_shapes, strict: as for ``compile``.

    Returns:
        An ``ExportedProgram`` in core ATen without ``torch.ops.dilated_compile.*`` ops.

    Example::

        >>> program = dilated_compile.tensorrt.lower(model, (x,))
        >>> {n.target for n in program.graph.nodes if n.op == "call_function"}
    """
    program = as_program(module_or_program, args, kwargs, dynamic_shapes, strict, "tensorrt.lower")
    table = torch.export.default_decompositions()
    table.update(dilated_attention_decompositions())
    program = program.run_decompositions(table)
    left = dilated_op_nodes(program)
    if left:
        raise RuntimeError(f"tensorrt.lower: {left} have no decomposition into aten ops")
    return program


def compile(
    module_or_program: torch.nn.Module | ExportedProgram,
    args: tuple[Any, ...],
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    strict: bool = True,
    arg_inputs: Any = None,
    **trt_options: Any,
) -> torch.fx.GraphModule:
    """Lower a model (``lower``) and build it with ``torch_tensorrt.dynamo.compile``.

    Args:
        module_or_program: an ``nn.Module`` (exported with ``dilated_compile.export``) or an
            ``ExportedProgram`` from ``dilated_compile.export``; on CUDA.
        args: example positional inputs (a tuple of CUDA tensors).
        kwargs, dynamic_shapes, strict: passed to ``dilated_compile.export`` for a module.
        arg_inputs: Torch-TensorRT's input specs; default ``args``. For a dynamic sequence
            length give ``torch_tensorrt.Input(min_shape=..., opt_shape=..., max_shape=...,
            dtype=...)`` per input, within the exported range.
        **trt_options: passed to ``torch_tensorrt.dynamo.compile`` (``use_explicit_typing``,
            ``min_block_size``, ``require_full_compilation``, ...).

    Returns:
        The ``torch.fx.GraphModule`` Torch-TensorRT returns (TensorRT engines inside); save it
        with ``torch_tensorrt.save``.

    Raises:
        ImportError: naming the ``dilated-compile[tensorrt]`` extra, without ``torch_tensorrt``.

    Example::

        >>> import torch_tensorrt
        >>> seq = torch.export.Dim("seq", min=16, max=8192)
        >>> trt_model = dilated_compile.tensorrt.compile(
        ...     model.cuda(), (tokens.cuda(),), dynamic_shapes={"tokens": {1: seq}},
        ...     arg_inputs=[torch_tensorrt.Input(min_shape=(1, 16), opt_shape=(1, 2048),
        ...                                      max_shape=(1, 8192), dtype=torch.int64)])
        >>> logits = trt_model(tokens.cuda())
    """
    torch_tensorrt = _import_torch_tensorrt()
    program = lower(
        module_or_program, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict
    )
    return torch_tensorrt.dynamo.compile(
        program, arg_inputs=list(args) if arg_inputs is None else arg_inputs,
        kwarg_inputs=kwargs, **trt_options,
    )
