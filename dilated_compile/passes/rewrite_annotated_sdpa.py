"""Rewrite annotated SDPA calls into the ops of their attention families.

Finds ``annotation(scaled_dot_product_attention(q, k, v, ...), payload, pattern)`` pairs (what
``dilated(...)``, ``block_sparse(...)`` and ``sequence_parallel(...)`` leave in a captured graph)
and replaces each pair with the family's op, e.g. ``dilated_attention(q, k, v, ...)[0]``; the
payload's ``"kind"`` picks the family (``attention_family``), ``pattern`` (a block-sparse layout)
becomes the op's tensor input, and a mask on the annotation (``sequence_parallel``'s) the op's
``attn_mask``. SDPA calls without an annotation are left alone. Works on Dynamo graphs
(``F.scaled_dot_product_attention`` targets) and on aten-level graphs
(``aten.scaled_dot_product_attention``, as in ``torch.export``). Running it twice changes nothing.

Each rewrite is counted in ``torch._dynamo.utils.counters["dilated_compile"]["sdpa_rewritten"]``
and recorded in ``gm.meta["dilated_compile.rewrites"]`` (a list of ``Rewrite``).
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from ..annotation import bind_sdpa_arguments, check_unsupported_sdpa_arguments
from ..attention_family import family_of_payload
from ..ops import annotation_op
from ..ops._numerics import lse_dtype

SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
REWRITES_META_KEY = "dilated_compile.rewrites"


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One rewritten call: the SDPA node's name in the graph before, the op it became, the spec,
    and where the call is in the user's code (``file.py:line in function``, when known)."""

    node: str
    op: str
    spec: Any
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source} ({self.node})" if self.source else self.node
        return f"{where}: scaled_dot_product_attention -> {self.op} {self.spec}"


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULES_DIR = os.path.join(_PACKAGE_DIR, "nn")
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _is_model_code(filename: str) -> bool:
    """Frames of the model: not PyTorch's (export's own wrappers appear in strict traces), not
    this library's machinery (the annotation); this library's modules count as model code."""
    path = os.path.abspath(filename)
    if path.startswith(_MODULES_DIR + os.sep):
        return True
    return not path.startswith((_PACKAGE_DIR + os.sep, _TORCH_DIR + os.sep))


def _user_source(node: torch.fx.Node) -> str:
    """The innermost frame of the node's stack trace in model code: the SDPA call's line."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', node.meta.get("stack_trace") or "")
    for filename, line, function in reversed(frames):
        if _is_model_code(filename):
            return f"{os.path.basename(filename)}:{line} in {function}"
    return ""


def _check(sdpa: torch.fx.Node, spec: Any, arguments: dict[str, Any]) -> None:
    # Tensor shapes were checked when the call was captured and are checked again by the op's
    # fake kernel; here: what the op cannot honour, and scalars the op needs as constants.
    check_unsupported_sdpa_arguments(spec, arguments["dropout_p"])
    for name in ("is_causal", "scale", "enable_gqa"):
        if isinstance(arguments[name], torch.fx.Node):
            raise ValueError(
                f"cannot rewrite {sdpa.name}: its {name} is computed in the graph "
                f"({arguments[name].name}); the attention op needs it as a constant"
            )


def _annotation_arguments(node: torch.fx.Node) -> tuple[Any, str, Any, Any]:
    """``(sdpa node, payload, pattern node or None, attn_mask node or None)`` of an annotation
    node."""
    sdpa, payload, *rest = node.args
    pattern = rest[0] if rest else node.kwargs.get("pattern")
    attn_mask = rest[1] if len(rest) > 1 else node.kwargs.get("attn_mask")
    return sdpa, payload, pattern, attn_mask


def _example(node: Any) -> Any:
    """The example value of a graph node (what a spec is rebuilt around), or the value itself."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def rewrite_annotated_sdpa(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace every annotated SDPA pair in ``gm`` with its family's op (in place; returns gm)."""
    graph = gm.graph
    rewrites = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not annotation_op:
            continue
        sdpa, payload, pattern, annotation_mask = _annotation_arguments(node)
        family = family_of_payload(payload)
        spec = family.from_json(payload, _example(pattern))
        if not (isinstance(sdpa, torch.fx.Node) and sdpa.op == "call_function"
                and sdpa.target in SDPA_TARGETS):
            raise ValueError(
                f"annotation node {node.name} marks {sdpa}, which is not a "
                "scaled_dot_product_attention call; only SDPA calls can be annotated"
            )
        arguments = bind_sdpa_arguments(sdpa.args, sdpa.kwargs)
        if annotation_mask is not None:  # a mask the SDPA node could not hold (sequence_parallel)
            if arguments["attn_mask"] is not None:
                raise ValueError(
                    f"annotation node {node.name} and the SDPA call it marks ({sdpa.name}) both "
                    "hold an attn_mask; only one of them may"
                )
            arguments["attn_mask"] = annotation_mask
        _check(sdpa, spec, arguments)
        op_args = (arguments["query"], arguments["key"], arguments["value"],
                   *family.pattern_args(spec, pattern),
                   bool(arguments["is_causal"]), arguments["scale"])
        if arguments["attn_mask"] is not None:  # unmasked calls keep the op's short form
            op_args += (arguments["attn_mask"],)
        with graph.inserting_before(node):
            op_node = graph.call_function(family.op, op_args)
            out_node = op_node
            if family.returns_lse:
                out_node = graph.call_function(operator.getitem, (op_node, 0))
        _copy_meta(sdpa, op_node, out_node)
        node.replace_all_uses_with(out_node)
        graph.erase_node(node)
        if not sdpa.users:
            graph.erase_node(sdpa)
        rewrites.append(Rewrite(sdpa.name, family.op_name, spec, _user_source(sdpa)))
        counters["dilated_compile"]["sdpa_rewritten"] += 1
    if rewrites:
        graph.lint()
        gm.recompile()
    gm.meta.setdefault(REWRITES_META_KEY, []).extend(rewrites)
    return gm


def _copy_meta(sdpa: torch.fx.Node, op_node: torch.fx.Node, out_node: torch.fx.Node) -> None:
    """Keep source locations and module stacks; give the new nodes example values."""
    if op_node is out_node:  # an op that returns the output alone
        op_node.meta.update(sdpa.meta)
        return
    for key, value in sdpa.meta.items():
        if key not in ("val", "example_value", "tensor_meta"):
            op_node.meta[key] = value
    out_node.meta.update(sdpa.meta)
    for key in ("val", "example_value"):
        out = sdpa.meta.get(key)
        if isinstance(out, torch.Tensor):
            op_node.meta[key] = (out, out.new_empty(out.shape[:-1], dtype=lse_dtype(out.dtype)))
