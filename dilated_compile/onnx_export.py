"""``to_onnx``: the rewritten model as ONNX, in standard ops or with one custom node per call.

- Default: the dilated and block-sparse ops are replaced by their decompositions into aten ops
  (``dilated_compile.ops.decompositions``) before the PyTorch ONNX exporter translates the graph,
  so the model is made of standard ONNX ops (MatMul, Exp, Log, ReduceMax, ReduceSum, Where,
  Pad, Gather, Reshape, ...) that any runtime (ONNX Runtime, say) runs. Memory is
  ``O(N * w / r)`` per head and config, as for the decomposition.
- ``custom_domain=True``: each dilated op becomes a single node ``DilatedAttention`` of the domain
  ``dilated_compile`` (opset version 1), for runtimes that bring their own kernel (block-sparse
  calls have no custom node: they are exported in standard ops, as by default):

  ========================  =================================================================
  inputs                    ``query`` [B, Hq, Nq, D], ``key`` [B, Hkv, Nk, D], ``value``
                            [B, Hkv, Nk, Dv] (Nq <= Nk: query i is position Nk - Nq + i);
                            float16, bfloat16, float or double; optional ``attn_mask``
                            broadcastable to [B, Hq, Nq, Nk], bool (true = keep) or float
                            (added to the scores), present only when the call passed one
  outputs                   ``output`` [B, Hq, Nq, Dv] (the inputs' type), ``lse`` [B, Hq, Nq]
                            (float; double for double inputs)
  ``segment_lengths``       ints, ``w_i``
  ``dilation_rates``        ints, ``r_i``
  ``mode``                  string, ``"mixture"`` or ``"head_groups"``
  ``is_causal``             int, 0 or 1
  ``scale``                 float, the score scale (``1/sqrt(D)`` resolved at export time)
  ========================  =================================================================

  with the semantics of ``torch.ops.dilated_compile.dilated_attention`` (docs/usage.md).

Needs the ``onnx`` extra: ``pip install "dilated-compile[onnx]"`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

import torch
from torch.export import ExportedProgram

from .export import as_program, dilated_op_nodes
from .ops import dilated_attention_op
from .ops.block_sparse_decompositions import block_sparse_attention_decompositions
from .ops.decompositions import dilated_attention_decompositions

__all__ = ["CUSTOM_DOMAIN", "CUSTOM_OP_TYPE", "to_onnx"]

CUSTOM_DOMAIN = "dilated_compile"
CUSTOM_OP_TYPE = "DilatedAttention"
CUSTOM_DOMAIN_VERSION = 1


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"dilated_compile.to_onnx needs {module!r}, which is not installed: "
            'pip install "dilated-compile[onnx]" (onnx, onnxscript and onnxruntime)'
        ) from error


def _custom_op():
    """The ``dilated_compile.DilatedAttention`` node builder for the exporter (onnxscript needs
    the op's schema to create the node; it is given here, not registered globally)."""
    onnx, onnxscript = _require("onnx"), _require("onnxscript")
    schema = onnx.defs.OpSchema
    param, attribute, kind = schema.FormalParameter, schema.Attribute, schema.AttrType
    op_schema = schema(
        CUSTOM_OP_TYPE, CUSTOM_DOMAIN, CUSTOM_DOMAIN_VERSION,
        "Dilated attention (LongNet) with the semantics of torch.ops.dilated_compile.dilated_attention.",
        inputs=[
            param("query", "T", "[B, Hq, Nq, D]"),
            param("key", "T", "[B, Hkv, Nk, D]"),
            param("value", "T", "[B, Hkv, Nk, Dv]"),
            param(
                "attn_mask", "M",
                "broadcastable to [B, Hq, Nq, Nk]: bool (true = keep) or float (added to the "
                "scores), applied on top of the pattern",
                param_option=schema.FormalParameterOption.Optional,
            ),
        ],
        outputs=[
            param("output", "T", "[B, Hq, Nq, Dv]"),
            param("lse", "L", "[B, Hq, Nq], the log-sum-exp of each row (-inf: no key)"),
        ],
        type_constraints=[
            ("T", ["tensor(float16)", "tensor(bfloat16)", "tensor(float)", "tensor(double)"],
             "inputs and output"),
            ("L", ["tensor(float)", "tensor(double)"], "log-sum-exp"),
            ("M", ["tensor(bool)", "tensor(float16)", "tensor(bfloat16)", "tensor(float)",
                   "tensor(double)"], "attention mask"),
        ],
        attributes=[
            attribute("segment_lengths", kind.INTS, "segment length w_i of each config"),
            attribute("dilation_rates", kind.INTS, "dilation rate r_i of each config"),
            attribute("mode", kind.STRING, "'mixture' or 'head_groups'"),
            attribute("is_causal", kind.INT, "1: keys at or before the query only"),
            attribute("scale", kind.FLOAT, "score scale"),
        ],
    )
    opset = onnxscript.values.Opset(CUSTOM_DOMAIN, CUSTOM_DOMAIN_VERSION)
    return onnxscript.values.Op(opset, CUSTOM_OP_TYPE, op_schema)


def _custom_translation_table() -> dict:
    node = _custom_op()

    def dilated_attention(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale=None,
                          attn_mask=None):
        if scale is None:
            head_dim = q.shape[-1] if q.shape is not None else None
            if not isinstance(head_dim, int):
                raise ValueError(
                    "to_onnx(custom_domain=True) writes the score scale as an attribute, but the "
                    f"head dim of {q.name} is not a number ({head_dim}); pass scale=... to SDPA"
                )
            scale = 1.0 / math.sqrt(head_dim)
        inputs = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
        return node(
            *inputs, segment_lengths=list(segment_lengths), dilation_rates=list(dilation_rates),
            mode=mode, is_causal=int(is_causal), scale=float(scale),
        )

    return {dilated_attention_op: dilated_attention}


def to_onnx(
    module_or_program: torch.nn.Module | ExportedProgram,
    args: tuple[Any, ...],
    path: str | os.PathLike,
    *,
    custom_domain: bool = False,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    strict: bool = True,
    **export_options: Any,
):
    """Export a model to an ONNX file.

    Args:
        module_or_program: an ``nn.Module`` (exported with ``dilated_compile.export``) or an
            ``ExportedProgram`` from ``dilated_compile.export``.
        args: example positional inputs (a tuple).
        path: the ``.onnx`` file to write.
        custom_domain: False (default): standard ONNX ops only (the op's decomposition); True:
            one ``dilated_compile.DilatedAttention`` node per call (see the module docstring).
        kwargs, dynamic_shapes, strict: passed to ``dilated_compile.export`` for a module; the
            dynamic dimensions become symbolic ONNX dimensions.
        **export_options: passed to ``torch.onnx.export`` (``opset_version``,
            ``external_data``, ``input_names``, ``output_names``, ...).

    Returns:
        The ``torch.onnx.ONNXProgram`` (its ``model_proto`` is what was written to ``path``).

    Example::

        >>> seq = torch.export.Dim("seq", max=65536)
        >>> dilated_compile.to_onnx(model, (tokens,), "model.onnx",
        ...                         dynamic_shapes={"tokens": {1: seq}})
        >>> import onnxruntime
        >>> session = onnxruntime.InferenceSession("model.onnx")
        >>> (logits,) = session.run(None, {"tokens": tokens.numpy()})
    """
    for module in ("onnx", "onnxscript"):
        _require(module)
    if "custom_translation_table" in export_options or "dynamo" in export_options:
        raise TypeError(
            "to_onnx sets custom_translation_table and dynamo=True itself; choose the dilated "
            "ops' translation with custom_domain=True/False"
        )
    program = as_program(module_or_program, args, kwargs, dynamic_shapes, strict, "to_onnx")
    if custom_domain:
        table = _custom_translation_table()
        # Block-sparse calls have no custom node: they become standard ops either way.
        if any(name.startswith("dilated_compile::block_sparse") for name in dilated_op_nodes(program)):
            program = program.run_decompositions(block_sparse_attention_decompositions())
    else:
        table = None
        if dilated_op_nodes(program):
            program = program.run_decompositions(dilated_attention_decompositions())
        left = dilated_op_nodes(program)
        if left:
            raise RuntimeError(
                f"to_onnx: {left} have no decomposition into standard ops; export with "
                "custom_domain=True for a runtime that implements them"
            )
    return torch.onnx.export(
        program, args, os.fspath(path), kwargs=kwargs, dynamo=True,
        custom_translation_table=table, **export_options,
    )
