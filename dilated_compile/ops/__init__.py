"""Custom ops of the ``dilated_compile`` namespace (``torch.ops.dilated_compile.*``).

Importing this package registers the ops. Passes, exporters and tests use the aliases below.
"""

from .annotation import annotation_op
from .block_sparse_attention import block_sparse_attention_backward_op, block_sparse_attention_op
from .dilated_attention import dilated_attention_backward_op, dilated_attention_op
from .sequence_parallel_attention import (
    sequence_parallel_attention_backward_op,
    sequence_parallel_attention_op,
)

__all__ = [
    "annotation_op",
    "block_sparse_attention_backward_op",
    "block_sparse_attention_op",
    "dilated_attention_backward_op",
    "dilated_attention_op",
    "sequence_parallel_attention_backward_op",
    "sequence_parallel_attention_op",
]
