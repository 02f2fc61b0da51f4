"""Custom ops of the ``dilated_compile`` namespace (``torch.ops.dilated_compile.*``).

Importing this package registers the ops. Passes, exporters and tests use the aliases below.
"""

from .annotation import annotation_op
from .dilated_attention import dilated_attention_backward_op, dilated_attention_op

__all__ = [
    "annotation_op",
    "dilated_attention_backward_op",
    "dilated_attention_op",
]
