"""Worker side of tests/test_train_sequence_parallel.py: one training step of
examples/train_sequence_parallel.py (sequence sharded zigzag, weights sharded with FSDP2) on
spawned gloo ranks against the single-process LongNetLM on the whole sequences (float64)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_sequence_parallel as example  # noqa: E402

TOL = {"atol": 1e-9, "rtol": 1e-7}


def one_step(rank, world):
    """The global loss and every parameter's gradient (gathered from its FSDP shards) equal the
    single-process model's, on a length that is a multiple of nothing useful (50 over 2 zigzag
    ranks: 24 and 26 positions)."""
    mesh = init_device_mesh("cpu", (world,))
    args = example.parse_args(["--tiny", "--batch-size", "3"])
    args.seq_len = 50
    model, task = example.build(args, torch.device("cpu"))
    model = model.double()
    reference = copy.deepcopy(model)
    example.shard_model(model, mesh)

    tokens, targets = task.batch(args.batch_size, torch.Generator().manual_seed(5), "cpu")
    expected = F.cross_entropy(reference(tokens).flatten(0, 1), targets.flatten(),
                               ignore_index=example.IGNORE)
    expected.backward()

    local = example.local_batch(task, args.batch_size, torch.Generator().manual_seed(5), "cpu", mesh)
    share = example.sequence_parallel_loss(model, *local, mesh)
    share.backward()
    loss = example.global_value(share, mesh)
    assert abs(loss - expected.item()) < 1e-12, (loss, expected.item())
    names = []
    for (name, p), (ref_name, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert name == ref_name
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        names.append(name)
    return {"loss": loss, "local length": local[0].shape[1], "parameters": len(names)}
