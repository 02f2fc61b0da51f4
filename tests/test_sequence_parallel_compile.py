"""sequence_parallel under torch.compile: no graph break, the op
``torch.ops.dilated_compile.sequence_parallel_attention`` in the graph, the same numbers as eager
mode (outputs and gradients), on 2 spawned gloo ranks (tests/sequence_parallel_compile_worker.py);
and ``torch.library.opcheck`` of the op and its backward on a world-size-1 gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from sequence_parallel_worker import free_port, run_group  # noqa: E402

from dilated_compile import BlockSparseSpec, DilatedSpec, dilated, sequence_parallel  # noqa: E402
from dilated_compile.attention_family import family_of_spec  # noqa: E402
from dilated_compile.distributed.call import SequenceParallelCall  # noqa: E402
from dilated_compile.ops import (  # noqa: E402
    sequence_parallel_attention_backward_op,
    sequence_parallel_attention_op,
)


def test_compiled_equals_eager_in_one_graph(tmp_path):
    """The context entered outside the compiled function and inside it (both nesting orders):
    no graph break, the op in the graph, outputs and gradients equal to eager mode; dynamic
    shapes and a rank without positions too."""
    expected = {"entered outside": "ok", "entered inside": "ok", "dynamic, empty shard": "ok"}
    assert run_group("sequence_parallel_compile_worker:compiled", 2, str(tmp_path)) == [expected] * 2


@pytest.fixture
def world_of_one():
    """A single-process gloo group (the world), destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# (pattern, is_causal, mask): dense with a mask, dilated causal, block-sparse with a layout.
OPCHECK_CASES = [
    (None, False, True),
    (DilatedSpec((4, 8), (1, 2)), True, False),
    (BlockSparseSpec(2, local_blocks=1, layout=torch.ones(1, 4, 4, dtype=torch.bool)), False, False),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["dense_mask", "dilated", "block_sparse_layout"])
def test_opcheck(world_of_one, case):
    pattern, causal, with_mask = case
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 7, d, generator=gen, dtype=torch.float64, requires_grad=True) for d in (4, 3))
    mask = torch.rand(1, 1, 7, 7, generator=gen) > 0.3 if with_mask else None
    call = SequenceParallelCall(pattern, "zigzag", "auto", world_of_one.group_name)
    args = (*call.op_args(call.pattern_tensor()), causal, None, mask)
    torch.library.opcheck(sequence_parallel_attention_op, (q, k, v, *args))
    grad_out = torch.randn(1, 4, 7, 3, generator=gen, dtype=torch.float64)
    inputs = [x.detach() for x in (q, k, v)]  # the backward has no backward of its own
    torch.library.opcheck(sequence_parallel_attention_backward_op, (grad_out, *inputs, *args))


def test_call_payload_round_trip():
    layout = torch.ones(1, 4, 4, dtype=torch.bool)
    for pattern in (None, DilatedSpec((4, 8), (1, 2)), BlockSparseSpec(2, local_blocks=1, layout=layout)):
        call = SequenceParallelCall(pattern, "zigzag", "ring", "7")
        again = SequenceParallelCall.from_json(call.to_json(), call.pattern_tensor())
        assert again == call and again.to_json() == call.to_json()
    with pytest.raises(ValueError, match="not a sequence-parallel annotation"):
        SequenceParallelCall.from_json(DilatedSpec((4,), (1,)).to_json())


def test_the_family_region_is_the_context_and_the_pattern_region(world_of_one):
    """The family's region (what ``apply`` opens for a spec) is the context and the pattern's
    region."""
    spec = DilatedSpec((4, 8), (1, 2))
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    call = SequenceParallelCall(spec, "zigzag", "all_gather", world_of_one.group_name)
    with family_of_spec(call).region(call):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sequence_parallel(layout="zigzag", strategy="all_gather"), dilated(spec):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
