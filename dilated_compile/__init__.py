"""dilated_compile: LongNet-style dilated attention for torch.compile.

Write ``F.scaled_dot_product_attention`` as usual, mark where it is dilated, compile::

    import torch, torch.nn.functional as F
    import dilated_compile
    from dilated_compile import DilatedSpec, dilated

    spec = DilatedSpec(segment_lengths=(2048, 4096), dilation_rates=(1, 2))

    @dilated(spec)
    def attend(q, k, v):                      # [B, H, N, D]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    fast = torch.compile(attend, backend="dilated_compile")   # or dilated_compile.compile(attend)
    print(dilated_compile.explain(attend, q, k, v))           # the rewrites it makes

Importing the package registers the ``torch.ops.dilated_compile.*`` ops and the
``"dilated_compile"`` backend; it initialises no CUDA context.
"""

from . import nn, ops, tensorrt  # noqa: F401 (nn: not in __all__, so `import *` never shadows torch.nn)
from .annotation import dilated
from .aot import aot_compile
from .apply_specs import AppliedSpecs, apply, register_region
from .block_sparse_annotation import block_sparse
from .block_sparse_spec import BlockSparseSpec
from .distributed import gather_sequence, sequence_parallel, sequence_positions, shard_sequence
from .backend import compile
from .explain import ExplainReport, explain
from .export import export
from .functional import dilated_attention
from .graph_breaks import GraphBreakInDilatedRegionWarning
from .onnx_export import to_onnx
from .spec import DilatedSpec

__version__ = "0.1.0"

__all__ = [
    "AppliedSpecs",
    "BlockSparseSpec",
    "DilatedSpec",
    "ExplainReport",
    "GraphBreakInDilatedRegionWarning",
    "aot_compile",
    "apply",
    "block_sparse",
    "compile",
    "dilated",
    "dilated_attention",
    "explain",
    "export",
    "gather_sequence",
    "ops",
    "register_region",
    "sequence_parallel",
    "sequence_positions",
    "shard_sequence",
    "tensorrt",
    "to_onnx",
]
