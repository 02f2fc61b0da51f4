"""``torch.ops.dilated_compile.annotation``: how an annotated SDPA call looks in a captured graph.

Inside a region (``dilated(...)``, ``block_sparse(...)``) under ``torch.compile``/``torch.export``,
an SDPA call is captured as the plain ``scaled_dot_product_attention`` node followed by
``annotation(sdpa_out, payload, pattern)``, where ``payload`` is the spec as JSON
(``spec.to_json()``, its ``"kind"`` naming the family) and ``pattern`` the tensor the spec
carries, if any (a block-sparse layout: a graph input, never a constant inside the payload). A
mask the SDPA node cannot hold travels as the annotation's ``attn_mask`` instead
(``sequence_parallel``: this rank's rows against every key of the sequence, which the SDPA node's
local keys do not cover). The rewrite pass replaces the pair with the family's op. Keeping the
annotation as a node argument (not only node metadata) means it is printed with the graph,
survives serialisation, and enters every compiled-artifact cache key, so a cache can never serve
a graph compiled for another spec.

If the graph reaches execution without the rewrite (a backend other than ``"dilated_compile"``),
the node raises instead of letting the dense SDPA result through: an annotation is never
silently dropped.
"""

from typing import Optional

import torch
from torch import Tensor

from ..attention_family import describe, family_of_payload

UNREWRITTEN_MESSAGE = (
    "F.scaled_dot_product_attention was called inside {annotation} but the captured graph "
    "was not rewritten, so it would compute dense attention. Compile with "
    "torch.compile(..., backend='dilated_compile') or dilated_compile.compile(...), or run the "
    "pass dilated_compile.passes.rewrite_annotated_sdpa on the graph first."
)


@torch.library.custom_op("dilated_compile::annotation", mutates_args=())
def _annotation_op(
    sdpa_out: Tensor, payload: str, pattern: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    spec = family_of_payload(payload).from_json(payload, pattern)
    raise RuntimeError(UNREWRITTEN_MESSAGE.format(annotation=describe(spec)))


@_annotation_op.register_fake
def _(sdpa_out, payload, pattern=None, attn_mask=None):
    return torch.empty_like(sdpa_out)


# Identity gradient, so autograd tracing of an unrewritten graph reaches the forward (and its
# error) rather than failing earlier with a message about missing autograd.
_annotation_op.register_autograd(lambda ctx, grad: (grad, None, None, None))

annotation_op = torch.ops.dilated_compile.annotation.default
