"""The ops called directly inside ``torch.compile(dynamic=True)``: Dynamo hands an op the ints
it reads from closures (a pattern's segment lengths, rates, block size...) as symbols. The ops
specialise them, so the call compiles once, serves every length, and equals eager."""

from __future__ import annotations

import pytest
import torch

from dilated_compile import BlockSparseSpec
from dilated_compile.ops import block_sparse_attention_op, dilated_attention_op


def _attention(family: str):
    spec = BlockSparseSpec(16, local_blocks=1, global_blocks=1, random_blocks=2, seed=3)
    segment_lengths, dilation_rates = [8, 16], [1, 2]  # read from the closure: symbols

    def attend(q, k, v):
        if family == "block_sparse":
            out, _ = block_sparse_attention_op(
                q, k, v, spec.block_size, spec.local_blocks, spec.global_blocks,
                spec.random_blocks, spec.seed, None, True, None)
        else:
            out, _ = dilated_attention_op(q, k, v, segment_lengths, dilation_rates, "mixture",
                                          True, None)
        return out.sin()

    return attend


@pytest.mark.parametrize("family", ["dilated", "block_sparse"])
def test_pattern_ints_from_a_closure_compile_once_with_dynamic_shapes(family):
    attend = _attention(family)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (30, 51):
        inputs = [torch.randn(2, h, n, 16, dtype=torch.float64, requires_grad=True)
                  for h in (4, 2, 2)]
        eager = [t.detach().clone().requires_grad_() for t in inputs]
        out, want = compiled(*inputs), attend(*eager)
        out.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(out, want)
        for got, ref in zip(inputs, eager):
            torch.testing.assert_close(got.grad, ref.grad)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
