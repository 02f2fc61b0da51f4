"""Worker side of tests/test_sequence_parallel.py: one gloo process group per test function, many
cases per group (spawning processes costs more than the cases).

Every case builds the full float64 q/k/v (the same seed on every rank), shards them, computes
this rank's rows inside ``sequence_parallel`` and compares outputs and the gradients of the
shards with the float64 ``dense_reference`` on the full sequence.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dilated_compile import (
    BlockSparseSpec, DilatedSpec, apply, block_sparse, dilated, gather_sequence, sequence_parallel,
    shard_sequence,
)
from dilated_compile.testing import dense_reference

TOL = {"atol": 1e-9, "rtol": 1e-7}

SPECS = {
    "dense": None,
    "dilated": DilatedSpec((4, 8), (1, 2)),
    "dilated_capped": DilatedSpec((5, 6, 32), (1, 2, 2)),  # lcm 30 > N, a segment > N
    "head_groups": DilatedSpec((4, 8), (1, 2), "head_groups"),
    "block_sparse": BlockSparseSpec(3, local_blocks=1, global_blocks=1, random_blocks=1, seed=3),
    "block_sparse_band": BlockSparseSpec(2, local_blocks=1),
    "dilated_short": DilatedSpec((3, 6), (1, 2)),  # windows that start past 0 on long sequences
}


# -- process groups -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@sequence_parallel(layout="zigzag", strategy="all_gather")  # applied before the group exists
def _zigzag_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _entry(rank: int, world: int, port: int, name: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        result = _worker(name)(rank, world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # Leave at once once the result is written: gloo's threads can abort the interpreter's own
    # teardown ("terminate called without an active exception"), which would fail a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(name: str):
    """The function ``name`` of this module, or ``"module:function"`` of another (importable from
    tests/, which the spawned ranks inherit on sys.path)."""
    if ":" not in name:
        return globals()[name]
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def run_torchrun(script, *args: str, ranks: int = 2, timeout: float = 300.0):
    """``script`` with ``args`` under ``torchrun --standalone`` on ``ranks`` CPU processes, from
    the repository root: the finished process (stdout and stderr captured as text)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=root)


def run_group(name: str, world: int, out_dir: str, timeout: float = 150.0) -> list:
    """Run ``name(rank, world)`` (see ``_worker``) on ``world`` spawned gloo ranks; their JSON
    results, by rank (None for a rank that exited cleanly without one: ``os._exit(0)``). Fails
    (never hangs) when a rank raises or the group outlives ``timeout`` seconds."""
    context = mp.start_processes(_entry, args=(world, free_port(), name, out_dir), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: the ranks did not finish within {timeout}s (a hang)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = []
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            results.append(None)
            continue
        with open(path) as f:
            results.append(json.load(f))
    return results


# -- the cases ------------------------------------------------------------------------------------

def _supported(strategy: str, kind: str, spec, causal: bool, mask: bool, hq: int, world: int) -> bool:
    """Which strategy computes which call exactly (the contract the implementation must keep)."""
    block_sparse_kind = isinstance(spec, BlockSparseSpec)
    if strategy == "ring":
        return not isinstance(spec, DilatedSpec)
    if strategy == "all_gather":
        return not (block_sparse_kind and not causal)
    if strategy == "all_to_all":
        return not hq % world
    return True  # auto: dilated -> all_gather; block-sparse -> all_gather, all_to_all or ring


def run_case(rank, world, *, strategy, kind, causal, n, layout, hq=4, hkv=4, mask=None,
             nesting="inside", seed=0, dtype="float64") -> str:
    """One case; returns "ok" or "raised: <message>" (after checking it should raise)."""
    spec = SPECS[kind]
    gen = torch.Generator().manual_seed(seed)
    b, d, dv = 2, 4, 3
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, n, dv, generator=gen, dtype=torch.float64)
    weights = torch.randn(b, hq, n, dv, generator=gen, dtype=torch.float64)
    full_mask = None
    if mask == "bool":
        full_mask = torch.rand(b, 1, n, n, generator=gen) > 0.3
    elif mask == "keypad":  # key padding, [B, 1, 1, N]
        full_mask = torch.arange(n).view(1, 1, 1, n) < torch.tensor([n, n - 3]).view(b, 1, 1, 1)
    elif mask == "float":
        full_mask = torch.randn(1, hq, n, n, generator=gen, dtype=torch.float64)
        full_mask = full_mask.masked_fill(torch.rand(n, n, generator=gen) > 0.8, -math.inf)
    low = getattr(torch, dtype)
    tol = TOL if low == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}
    shards = [shard_sequence(x, layout=layout).to(low, copy=True).requires_grad_() for x in (q, k, v)]
    local_mask = full_mask
    if full_mask is not None and full_mask.shape[2] != 1:  # a row-broadcast mask stays whole
        local_mask = shard_sequence(full_mask, layout=layout)
    if local_mask is not None and local_mask.dtype.is_floating_point:
        local_mask = local_mask.to(low)
    call = lambda: F.scaled_dot_product_attention(  # noqa: E731
        *shards, attn_mask=local_mask, is_causal=causal, enable_gqa=hq != hkv)
    region = dilated(spec) if isinstance(spec, DilatedSpec) else (
        block_sparse(spec) if spec is not None else None)
    supported = _supported(strategy, kind, spec, causal, mask is not None, hq, world)
    try:
        if region is None:
            with sequence_parallel(layout=layout, strategy=strategy):
                out = call()
        elif nesting == "inside":
            with sequence_parallel(layout=layout, strategy=strategy), region:
                out = call()
        else:
            with region, sequence_parallel(layout=layout, strategy=strategy):
                out = call()
    except ValueError as error:
        assert not supported, f"raised although supported: {error}"
        assert strategy in str(error) or "auto" in str(error), error
        return f"raised: {error}"
    assert supported, "computed a combination that should raise"
    (out.double() * shard_sequence(weights, layout=layout)).sum().backward()

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_spec = spec if spec is not None else DilatedSpec((max(n, 1),), (1,))
    ref = dense_reference(*full, ref_spec, is_causal=causal, enable_gqa=hq != hkv, attn_mask=full_mask)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out.double(), shard_sequence(ref, layout=layout), **tol)
    for name, shard, x in zip("qkv", shards, full):
        torch.testing.assert_close(shard.grad.double(), shard_sequence(x.grad, layout=layout), **tol,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    return "ok"


def _sweep(rank, world, cases, case=None) -> dict:
    """``case(rank, world, **c)`` (default: ``run_case``) for each ``c`` of ``cases``, by its JSON."""
    case = case or run_case
    results = {}
    for fields in cases:
        key = json.dumps(fields, sort_keys=True)
        try:
            results[key] = case(rank, world, **fields)
        except Exception as error:
            raise AssertionError(f"case {key} on rank {rank}: {error}") from error
    return results


def exactness_w2(rank, world):
    cases = []
    for layout, n, kind, causal, strategy in itertools.product(
            ("contiguous", "zigzag"), (13,), SPECS, (False, True),
            ("all_gather", "all_to_all", "ring", "auto")):
        cases.append(dict(strategy=strategy, kind=kind, causal=causal, n=n, layout=layout))
    # GQA (kv heads split, and repeated when too few), masks, the other nesting, tiny N.
    for layout, kind, strategy in itertools.product(
            ("contiguous", "zigzag"), ("dense", "dilated", "block_sparse"),
            ("all_gather", "all_to_all", "ring")):
        for hkv in (2, 1):
            cases.append(dict(strategy=strategy, kind=kind, causal=True, n=11, layout=layout, hkv=hkv))
        for mask in ("bool", "float", "keypad"):
            cases.append(dict(strategy=strategy, kind=kind, causal=False, n=11, layout=layout,
                              mask=mask, hkv=2))
        cases.append(dict(strategy=strategy, kind=kind, causal=True, n=11, layout=layout,
                          nesting="outside"))
        cases.append(dict(strategy=strategy, kind=kind, causal=False, n=1, layout=layout))
    # float32 (lse in float32, the ring's merge in float32).
    for strategy, kind, causal in [("ring", "dense", True), ("ring", "dense", False),
                                   ("all_gather", "dilated", False), ("all_to_all", "block_sparse", True)]:
        cases.append(dict(strategy=strategy, kind=kind, causal=causal, n=13, layout="zigzag",
                          hkv=2, dtype="float32"))
    # Two heads over two ranks: rank 1's head keeps offset 1 under rate 2 (all_to_all computes
    # the rank's heads part by part).
    for strategy in ("all_to_all", "auto"):
        cases.append(dict(strategy=strategy, kind="dilated", causal=False, n=13, layout="zigzag",
                          hq=2, hkv=2))
    return _sweep(rank, world, cases)


def exactness_w3(rank, world):
    cases = []
    for layout, n, kind, causal, strategy in itertools.product(
            ("contiguous", "zigzag"), (2, 16), ("dense", "dilated", "dilated_capped", "block_sparse"),
            (False, True), ("all_gather", "all_to_all", "ring")):
        cases.append(dict(strategy=strategy, kind=kind, causal=causal, n=n, layout=layout, hq=6,
                          hkv=3 if causal else 6, mask="bool" if n == 16 and not causal else None))
    # Long enough that non-causal dilated key windows start past 0 and end before N.
    for layout, kind, causal in itertools.product(
            ("contiguous", "zigzag"), ("dilated", "dilated_short", "head_groups"), (False, True)):
        cases.append(dict(strategy="all_gather", kind=kind, causal=causal, n=37, layout=layout,
                          hq=3, hkv=1, mask="float" if not causal else None))
    # all_to_all on heads whose offsets do not line up with a rank's share (1 or 2 heads per
    # rank, rates up to 2; head_groups cut across ranks), GQA repeated to split, masks per head
    # and per row travelling to the ranks of their heads.
    for layout, kind, causal, (hq, hkv) in itertools.product(
            ("contiguous", "zigzag"), ("dilated_short", "head_groups", "dilated_capped"), (False, True),
            ((3, 3), (6, 2))):
        cases.append(dict(strategy="all_to_all", kind=kind, causal=causal, n=16, layout=layout, hq=hq,
                          hkv=hkv, mask=None if causal else ("float" if hq == 3 else "bool")))
    # One position: rank 2's only head (head_groups' second group, offset 1) attends no key, and
    # its backward must still join the reverse all-to-all.
    cases.append(dict(strategy="all_to_all", kind="head_groups", causal=False, n=1, layout="contiguous",
                      hq=3, hkv=3))
    # GQA whose kv heads do not split over 3 ranks: 12 query heads over 2 kv heads (repeated 3x).
    for kind, causal in itertools.product(("dense", "block_sparse"), (False, True)):
        cases.append(dict(strategy="all_to_all", kind=kind, causal=causal, n=16, layout="zigzag",
                          hq=12, hkv=2))
    return _sweep(rank, world, cases)


def exactness_w1(rank, world):
    """One rank (torchrun --nproc-per-node 1): every strategy is the single-device op."""
    cases = [dict(strategy=strategy, kind=kind, causal=causal, n=9, layout=layout, hkv=2)
             for layout, kind, causal, strategy in itertools.product(
                 ("contiguous", "zigzag"), ("dense", "head_groups", "block_sparse"), (False, True),
                 ("all_gather", "all_to_all", "ring"))]
    return _sweep(rank, world, cases)


def shard_gather(rank, world):
    for layout, n in itertools.product(("contiguous", "zigzag"), (0, 1, 2, 5, 7, 12)):
        x = torch.randn(2, 3, n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        shard = shard_sequence(x, layout=layout).clone().requires_grad_()
        for given in (None, n):
            full = gather_sequence(shard, layout=layout, n=given)
            assert torch.equal(full, x), (layout, n)
        grads = [torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
                 for r in range(world)]
        (full * grads[rank]).sum().backward()
        torch.testing.assert_close(shard.grad, shard_sequence(sum(grads), layout=layout))
        # Along another dim, and a float32 tensor.
        y = x.permute(2, 0, 1, 3).float().contiguous()
        assert torch.equal(gather_sequence(shard_sequence(y, layout=layout, dim=0), layout=layout, dim=0), y)
    # A 1-D DeviceMesh names the group as well.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    x = torch.arange(10.0).view(1, 1, 10, 1)
    assert torch.equal(gather_sequence(shard_sequence(x, mesh, layout="zigzag"), mesh, layout="zigzag"), x)
    # Lengths that are not a layout's sharding raise on every rank.
    bad = torch.zeros(1, 1, 3 + rank, 1)
    try:
        gather_sequence(bad)
    except ValueError as error:
        return {"error": str(error), "traffic": traffic(rank, world)}
    raise AssertionError("no error for mismatched shard lengths")


def traffic(rank, world) -> dict:
    """Bytes received per strategy (the counters), for one call forward and backward."""
    from torch._dynamo.utils import counters

    b, hq, hkv, d, dv, n = 2, 6, 3, 4, 3, 13
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(b, h, n, e, generator=gen, dtype=torch.float64)
            for h, e in ((hq, d), (hkv, d), (hkv, dv))]
    result = {}
    for strategy in ("all_gather", "all_to_all", "ring"):
        shards = [shard_sequence(x, layout="zigzag").clone().requires_grad_() for x in full]
        counters.clear()
        with sequence_parallel(layout="zigzag", strategy=strategy):
            out = F.scaled_dot_product_attention(*shards, is_causal=True, enable_gqa=True)
        forward = counters["dilated_compile"][f"sequence_parallel_bytes_{strategy}"]
        out.sum().backward()
        total = counters["dilated_compile"][f"sequence_parallel_bytes_{strategy}"]
        result[strategy] = [forward, total - forward]
    return result


def _raised(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def mismatches(rank, world):
    """Calls that differ across ranks: every rank raises the same ValueError (no hang)."""
    messages = {}

    def attend(q, k, v, spec=None, causal=True, **sp):
        with sequence_parallel(**sp):
            if spec is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            with dilated(spec):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    x = lambda n, h=4, dtype=torch.float64: torch.randn(1, h, n, 8, dtype=dtype)  # noqa: E731
    messages["length"] = _raised(lambda: attend(x(5 + 2 * rank), x(5 + 2 * rank), x(5 + 2 * rank)))
    messages["heads"] = _raised(lambda: attend(x(5, 4 + 2 * rank), x(5, 4 + 2 * rank), x(5, 4 + 2 * rank)))
    dtype = torch.float32 if rank else torch.float64
    messages["dtype"] = _raised(lambda: attend(x(5, dtype=dtype), x(5, dtype=dtype), x(5, dtype=dtype)))
    spec = DilatedSpec((4, 8), (1, 1 + rank))
    messages["spec"] = _raised(lambda: attend(x(5), x(5), x(5), spec=spec))
    messages["causal"] = _raised(lambda: attend(x(5), x(5), x(5), causal=bool(rank)))
    messages["strategy"] = _raised(lambda: attend(x(5), x(5), x(5), strategy=("ring", "all_gather")[rank]))
    with sequence_parallel():
        messages["dropout"] = _raised(lambda: F.scaled_dot_product_attention(x(5), x(5), x(5), dropout_p=0.1))
    # An invalid call on one rank only: it raises its own error, the others name it.
    kv_heads = 3 if rank == 0 else 4  # 4 query heads over 3 kv heads: invalid on rank 0
    messages["invalid"] = _raised(lambda: attend(x(5), x(5, h=kv_heads), x(5, h=kv_heads)))
    # Unsupported combinations raise clearly.
    bs = BlockSparseSpec(2, local_blocks=1)
    with sequence_parallel(strategy="all_gather"), block_sparse(bs):
        messages["bs_all_gather"] = _raised(lambda: F.scaled_dot_product_attention(x(5), x(5), x(5)))
    with sequence_parallel(strategy="ring"), dilated(spec=DilatedSpec((4,), (1,))):
        messages["dilated_ring"] = _raised(lambda: F.scaled_dot_product_attention(x(5), x(5), x(5)))
    # A matching call afterwards still works (nothing left half-done).
    out = attend(x(5), x(5), x(5))
    assert out.shape == (1, 4, 5, 8)
    return messages


def compiled(rank, world):
    """torch.compile(backend="dilated_compile"): the sequence-parallel call becomes the op
    ``sequence_parallel_attention`` (tests/test_sequence_parallel_compile.py) and the result
    equals eager mode."""
    spec = DilatedSpec((4, 8), (1, 2))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 13, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    q, k, v = (shard_sequence(t, layout="zigzag") for t in (q, k, v))

    def attend(q, k, v):
        q = q * 2
        with dilated(spec):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.relu()

    compiled_attend = torch.compile(attend, backend="dilated_compile")
    local = compiled_attend(q, k, v)  # outside any context: this shard's own dilated attention
    with sequence_parallel(layout="zigzag", strategy="all_gather"):
        eager = attend(q, k, v)
        # The same compiled function, now inside a context: its guards send it to a recompile.
        fast = compiled_attend(q, k, v)
    torch.testing.assert_close(fast, eager, atol=0, rtol=0)
    assert not torch.equal(local, eager)
    torch.testing.assert_close(compiled_attend(q, k, v), local, atol=0, rtol=0)  # and back
    # The other nesting (the pattern region encloses the context) and plain SDPA (dense), compiled.
    def plain(q, k, v):
        return F.scaled_dot_product_attention(q * 2, k, v, is_causal=True).relu()

    with dilated(spec), sequence_parallel(layout="zigzag", strategy="all_gather"):
        fast = torch.compile(plain, backend="dilated_compile")(q, k, v)
    torch.testing.assert_close(fast, eager, atol=0, rtol=0)
    compiled_plain = torch.compile(plain, backend="dilated_compile")
    local = compiled_plain(q, k, v)  # outside: plain SDPA on the shard
    with sequence_parallel(layout="zigzag"):
        eager_dense = plain(q, k, v)
        fast = compiled_plain(q, k, v)
    torch.testing.assert_close(fast, eager_dense, atol=0, rtol=0)
    assert not torch.equal(local, eager_dense)
    assert not torch.equal(eager_dense, eager)
    # apply(model, spec): the model's SDPA calls inside the context.
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return plain(q, k, v)

    model = Attend()
    handle = apply(model, spec)
    with sequence_parallel(layout="zigzag", strategy="all_gather"):
        torch.testing.assert_close(model(q, k, v), eager, atol=0, rtol=0)
    handle.remove()
    with sequence_parallel(layout="zigzag", strategy="all_gather"):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(_zigzag_causal(q, k, v), expected, atol=0, rtol=0)
    # The decorator form, over the world's group given explicitly.
    decorated = sequence_parallel(dist.group.WORLD, layout="zigzag", strategy="all_gather")(attend)
    torch.testing.assert_close(decorated(q, k, v), eager, atol=0, rtol=0)
    return "ok"
