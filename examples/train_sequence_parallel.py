"""Train a small LongNetLM with every sequence split across the ranks (sequence parallelism) and
the weights sharded across the same ranks (FSDP2).

    torchrun --nproc-per-node=2 examples/train_sequence_parallel.py               # CPU: gloo
    torchrun --nproc-per-node=4 examples/train_sequence_parallel.py --seq-len 16384 \\
        --d-model 256 --heads 8 --layers 4 --ffn 1024                               # GPUs: nccl

The task and the model are those of examples/train_longnet.py: recall the key token at position
0 at query markers further on; LongNet's pattern (segments N/16, N/4, N, rates 1, 2, 4) and xPos
positions. The key lives on rank 0 and the queries of the middle of the sequence on the other
ranks, so the loss gets near 0 (from chance, ln of the number of keys) only through attention
across the ranks: on CPU with 2 ranks, after some 150 steps (about half a minute).

- The sequence: every rank draws the same batch (one seed) and keeps its zigzag shard of the
  tokens and targets (``shard_sequence``: chunks ``r`` and ``2W-1-r`` of ``2W``, which balances
  causal work). Inside ``sequence_parallel(mesh, layout="zigzag")`` every attention of the model
  attends over the whole sequence and xPos rotates each rank's rows by their global positions; the
  rest of the model (embedding, feed-forward, norms, output) is position-wise.
- The weights: ``fully_shard`` (FSDP2) on each layer and on the model, over the same 1-D mesh:
  each rank stores ``1/W`` of the parameters, gradients and optimizer state.
- The loss: each rank's cross-entropy summed over its own target tokens, divided by the number of
  target tokens of the whole batch (one all-reduce of the count); the ranks' losses add up to the
  global loss (another all-reduce, for printing), and so do their gradients (see
  ``shard_model``).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from train_longnet import IGNORE, RecallTask, add_task_arguments, make_model

from dilated_compile import sequence_parallel, shard_sequence
from dilated_compile.nn import LongNetLM

LAYOUT = "zigzag"

# FSDP2 warns that the model returns a view (the output projection's logits) because an in-place
# op on it would skip its backward hook; the loss below reads the logits out of place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

SIZES = {
    "default": dict(seq_len=256, d_model=64, heads=4, layers=2, ffn=128, batch_size=8, steps=200, lr=3e-3),
    "tiny": dict(seq_len=64, d_model=32, heads=4, layers=2, ffn=64, batch_size=2, steps=5, lr=3e-3),
}


def setup(device: str) -> tuple[torch.device, DeviceMesh]:
    """The process group (nccl on GPUs, gloo on CPU; torchrun sets the environment), this rank's
    device and the 1-D mesh of all ranks that holds both the sequence and the weights."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: LongNetLM, mesh) -> LongNetLM:
    """Shard the weights of ``model`` over ``mesh`` with FSDP2: each layer, then the rest.

    FSDP reduce-scatters the gradients and, by default, divides them by the mesh size: right for
    data parallelism, where each rank's loss is a mean over its own sequences. Here the ranks hold
    different positions of the *same* sequences (the data-parallel degree is 1) and each rank's
    loss is its share of one sum, so the gradient of the whole loss is the *sum* of the ranks'
    gradients: the divide factor is set to 1. (With a 2-D mesh of data x sequence ranks it would
    be the data-parallel size.) ``set_force_sum_reduction_for_comms`` makes that a plain SUM
    reduce-scatter (NCCL would otherwise use PREMUL_SUM, which gloo lacks).
    """
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def local_batch(task: RecallTask, batch_size: int, generator: torch.Generator, device, mesh):
    """This rank's zigzag shard of a batch: tokens and targets ``[B, n_r]``. Every rank draws the
    whole batch with the same generator (a real loader would read only its shard)."""
    tokens, targets = task.batch(batch_size, generator, device)
    return (shard_sequence(tokens, mesh, layout=LAYOUT, dim=1),
            shard_sequence(targets, mesh, layout=LAYOUT, dim=1))


def sequence_parallel_loss(model: LongNetLM, tokens: torch.Tensor, targets: torch.Tensor, mesh):
    """This rank's share of the global loss: its cross-entropy summed over its target tokens,
    divided by the target tokens of every rank. Summed over the ranks: the mean cross-entropy of
    the whole batch, as one process computes it on the whole sequences."""
    with sequence_parallel(mesh, layout=LAYOUT):
        logits = model(tokens)  # this rank's rows [B, n_r, V]
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                            reduction="sum")
    count = (targets != IGNORE).sum()
    dist.all_reduce(count, group=mesh.get_group())
    return total / count.clamp(min=1)


def global_value(local: torch.Tensor, mesh) -> float:
    """The sum over the ranks of a scalar (the global loss from the ranks' shares)."""
    value = local.detach().clone()
    dist.all_reduce(value, group=mesh.get_group())
    return value.item()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when available)")
    add_task_arguments(parser)
    parser.add_argument("--log-every", type=int, default=20)
    args = parser.parse_args(argv)
    for name, value in SIZES["tiny" if args.tiny else "default"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seq_len % 16:
        parser.error(f"--seq-len must be a multiple of 16, got {args.seq_len}")
    return args


def build(args, device) -> tuple[LongNetLM, RecallTask]:
    """The task and the model, not sharded yet (the same initial weights on every rank: one
    seed); LongNet's pattern for N, as in examples/train_longnet.py."""
    n = args.seq_len
    task = RecallTask(seq_len=n, num_keys=args.num_keys, first_query=n // 16)
    torch.manual_seed(args.seed)
    return make_model(args, task, (n // 16, n // 4, n), (1, 2, 4), device), task


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    device, mesh = setup(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model, task = build(args, device)
        shard_model(model, mesh)
        if rank == 0:
            print(f"{world} ranks ({dist.get_backend()}), {device.type}: N={task.seq_len} split "
                  f"{LAYOUT} (~{task.seq_len // world} positions per rank), weights sharded with "
                  f"FSDP2; d_model={args.d_model}, {args.layers} layers, {args.steps} steps of "
                  f"{args.batch_size} sequences", flush=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        generator = torch.Generator().manual_seed(args.seed)
        losses, start = [], time.perf_counter()
        for step in range(args.steps):
            tokens, targets = local_batch(task, args.batch_size, generator, device, mesh)
            loss = sequence_parallel_loss(model, tokens, targets, mesh)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(global_value(loss, mesh))
            if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
        if rank == 0:
            tokens_per_s = args.steps * args.batch_size * task.seq_len / (time.perf_counter() - start)
            print(f"done: {tokens_per_s:,.0f} tokens/s over {world} ranks (chance: "
                  f"ln {task.num_keys} = {torch.tensor(float(task.num_keys)).log():.3f})", flush=True)
        return losses
    finally:
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
