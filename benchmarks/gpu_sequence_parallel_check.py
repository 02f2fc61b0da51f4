"""Sequence-parallel attention on one CUDA GPU, world size 1 (NCCL): every strategy and family
runs the single-device kernels and must equal the op called directly, outputs and gradients,
in both layouts, and under ``torch.compile`` (the sequence-parallel op and its backward).

A one-rank group exercises the whole path (signature exchange, collectives on CUDA tensors,
the strategies' op calls and merges) on the device; multi-GPU runs are
``benchmarks/bench_sequence_parallel.py``'s job. Usage::

    DILATED_COMPILE_AUTOTUNE=0 PYTHONPATH=. python benchmarks/gpu_sequence_parallel_check.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dilated_compile import BlockSparseSpec, DilatedSpec, block_sparse, dilated, sequence_parallel
from dilated_compile.ops.dilated_attention import uses_triton_kernels

N, B, HQ, HKV, D = 3000, 1, 8, 4, 64
PATTERNS = {
    "dense": None,
    "dilated": DilatedSpec((512, 1024, 2048), (1, 2, 4)),
    "block_sparse": BlockSparseSpec(64, local_blocks=1, global_blocks=1, random_blocks=2, seed=3),
}
REGION = {"dilated": dilated, "block_sparse": block_sparse}


def attend(pattern, q, k, v, causal, strategy=None, layout="contiguous"):
    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    spec = PATTERNS[pattern]
    region = REGION[pattern](spec) if spec is not None else None
    if strategy is None:
        if region is None:
            return sdpa()
        with region:
            return sdpa()
    with sequence_parallel(strategy=strategy, layout=layout):
        if region is None:
            return sdpa()
        with region:
            return sdpa()


def main():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(B, h, N, D, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = make(HQ), make(HKV), make(HKV)
    assert uses_triton_kernels(q, k, v)
    rows = []
    cases = [(p, c, s, lay, False) for p in PATTERNS for c in (False, True)
             for s in ("all_gather", "all_to_all", "ring") for lay in ("contiguous", "zigzag")]
    # Under torch.compile: the rewrite to the sequence-parallel op, its backward's recompute.
    cases += [(p, True, "auto", "zigzag", True) for p in PATTERNS]
    for pattern, causal, strategy, layout, compiled in cases:
        label = strategy + (" compiled" if compiled else "")
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        try:
            if compiled:
                torch._dynamo.reset()
                fn = torch.compile(attend, backend="dilated_compile", fullgraph=True)
                out = fn(pattern, *inputs, causal, strategy, layout)
            else:
                out = attend(pattern, *inputs, causal, strategy, layout)
        except ValueError as error:  # a combination the strategy does not serve
            rows.append((pattern, causal, label, layout, "refused", str(error).split(".")[0][:60]))
            continue
        ref = attend(pattern, *ref_inputs, causal)
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        got = [out, *(t.grad for t in inputs)]
        want = [ref, *(t.grad for t in ref_inputs)]
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want)]
        status = "ok" if max(errs) < 1e-2 else "MISMATCH"
        rows.append((pattern, causal, label, layout, status, " ".join(f"{e:.1e}" for e in errs)))
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} world_size=1 backend=nccl")
    print("| pattern | causal | strategy | layout | result | rel err out dq dk dv (vs the op, bf16) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    dist.destroy_process_group()
    if any(r[4] == "MISMATCH" for r in rows):
        raise SystemExit("mismatch")


if __name__ == "__main__":
    main()
