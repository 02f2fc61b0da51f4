"""``torch.ops.dilated_compile.annotation``: how an annotated SDPA call looks in a captured graph.

Inside ``dilated(...)`` under ``torch.compile``/``torch.export``, an SDPA call is captured as the
plain ``scaled_dot_product_attention`` node followed by ``annotation(sdpa_out, payload)``, where
``payload`` is the annotation as JSON (``DilatedSpec.to_json()``). The rewrite pass replaces the
pair with the dilated op. Keeping the annotation as a node argument (not only node metadata)
means it is printed with the graph, survives serialisation, and enters every compiled-artifact
cache key, so a cache can never serve a graph compiled for another spec.

If the graph reaches execution without the rewrite (a backend other than ``"dilated_compile"``),
the node raises instead of letting the dense SDPA result through: an annotation is never
silently dropped.
"""

import torch
from torch import Tensor

from ..spec import DilatedSpec

UNREWRITTEN_MESSAGE = (
    "F.scaled_dot_product_attention was called inside dilated({annotation}) but the captured graph "
    "was not rewritten, so it would compute dense attention. Compile with "
    "torch.compile(..., backend='dilated_compile') or dilated_compile.compile(...), or run the "
    "pass dilated_compile.passes.rewrite_annotated_sdpa on the graph first."
)


@torch.library.custom_op("dilated_compile::annotation", mutates_args=())
def _annotation_op(sdpa_out: Tensor, payload: str) -> Tensor:
    raise RuntimeError(UNREWRITTEN_MESSAGE.format(annotation=DilatedSpec.from_json(payload)))


@_annotation_op.register_fake
def _(sdpa_out, payload):
    return torch.empty_like(sdpa_out)


# Identity gradient, so autograd tracing of an unrewritten graph reaches the forward (and its
# error) rather than failing earlier with a message about missing autograd.
_annotation_op.register_autograd(lambda ctx, grad: (grad, None))

annotation_op = torch.ops.dilated_compile.annotation.default
