"""Worker side of tests/test_sequence_parallel_sparse_gather.py: dilated attention with
``strategy="all_gather"`` (LongNet's sparse all-gather) on spawned gloo groups, through
``sequence_parallel_worker.run_case`` (outputs and gradients of every shard against the float64
dense reference), with the bytes each call receives held to the documented traffic.

The traffic of a call is the number of key/value rows ``(kv head, position)`` of other ranks
that the rank's query rows attend (``count_matrix`` > 0, masks aside), times ``B * (D + Dv) *
itemsize``: ``attended_rows`` counts them from the dense pattern, independently of the plan.
"""

from __future__ import annotations

import itertools
import json

import torch
import torch.nn.functional as F
from sequence_parallel_worker import SPECS, run_case
from torch._dynamo.utils import counters

from dilated_compile import DilatedSpec, dilated, sequence_parallel, shard_sequence
from dilated_compile.distributed import sparse_all_gather
from dilated_compile.distributed.layout import chunk_ranges
from dilated_compile.testing import count_matrix

# The patterns run_case knows by name, and these (each process of a group registers them).
SPECS.update({
    # Rates that do not divide the heads: the query heads of one kv head use different offsets;
    # lcm(segment lengths) = 30 exceeds a shard.
    "sparse_rates": DilatedSpec((6, 10, 15), (2, 3, 5)),
    "sparse_head_groups": DilatedSpec((3, 6, 12), (1, 2, 3), "head_groups"),
    # Segments that tile shards of 4 and 8 positions: no communication.
    "sparse_aligned": DilatedSpec((2, 4), (1, 2)),
    # With 8 positions per rank: the 16-position segments span two shards, the 4 tile them.
    "sparse_fixed": DilatedSpec((4, 16), (1, 2)),
})
ROW_ELEMENTS = 2 * (4 + 3)  # one (kv head, position) row of K and V in run_case: B=2, D=4, Dv=3
_BYTES = "sequence_parallel_bytes_all_gather"


def attended_rows(spec: DilatedSpec, n: int, world: int, layout: str, rank: int, hq: int, hkv: int,
                  causal: bool) -> int:
    """Rows ``(kv head, position)`` held by other ranks that ``rank``'s query rows attend."""
    mine = torch.zeros(n, dtype=torch.bool)
    for a, b in chunk_ranges(n, world, layout, rank):
        mine[a:b] = True
    attends = count_matrix(spec, n, hq, is_causal=causal)[:, mine] > 0  # [Hq, rows, N]
    per_kv = attends.any(dim=1).view(hkv, hq // hkv, n).any(dim=1)  # [Hkv, N]
    return int((per_kv & ~mine).sum())


def _count_exchanges() -> list[int]:
    """Count the sparse all-gather's collectives (calls of its all-to-all) in this process."""
    calls = [0]
    exchange = sparse_all_gather._exchange

    def counted(*args):
        calls[0] += 1
        return exchange(*args)

    sparse_all_gather._exchange = counted
    return calls


def _sweep(rank: int, world: int, cases: list[dict]) -> dict:
    """Each case's result, the bytes it received and its collectives; the bytes are checked
    against ``attended_rows`` here, on every rank."""
    calls = _count_exchanges()
    results = {}
    for case in cases:
        key = json.dumps(case, sort_keys=True)
        counters["dilated_compile"][_BYTES] = 0
        calls[0] = 0
        try:
            result = run_case(rank, world, **case)
            received = counters["dilated_compile"][_BYTES]
            itemsize = getattr(torch, case.get("dtype", "float64")).itemsize
            expected = ROW_ELEMENTS * itemsize * attended_rows(
                SPECS[case["kind"]], case["n"], world, case["layout"], rank, case.get("hq", 4),
                case.get("hkv", 4), case["causal"])
            assert received == expected, f"received {received} bytes, the formula says {expected}"
        except Exception as error:
            raise AssertionError(f"case {key} on rank {rank}: {error}") from error
        results[key] = [result, received, calls[0]]
    return results


def _cases(kinds, ns, heads, layouts=("contiguous", "zigzag"), strategy="all_gather") -> list[dict]:
    """Causal and not; masks (bool over rows, float per head, key padding) when not causal."""
    cases = []
    for kind, n, (hq, hkv), layout in itertools.product(kinds, ns, heads, layouts):
        for causal, mask in [(True, None), (False, None), (False, "bool"), (False, "float"),
                             (False, "keypad")]:
            cases.append(dict(strategy=strategy, kind=kind, causal=causal, n=n, layout=layout,
                              hq=hq, hkv=hkv, mask=mask))
    return cases


KINDS = ("dilated", "dilated_capped", "head_groups", "sparse_rates", "sparse_head_groups")


def sparse_w1(rank, world):
    return _sweep(rank, world, _cases(KINDS, (13,), ((4, 2), (6, 3))))


def sparse_w2(rank, world):
    cases = _cases(KINDS, (13,), ((4, 2), (6, 3)))
    cases += _cases(("dilated", "sparse_rates", "sparse_head_groups"), (37,), ((6, 3),))
    cases += _cases(("sparse_aligned",), (16,), ((4, 2),))
    # float32 (the merge in float32), and "auto" (which picks all_gather for dilated).
    cases += [dict(strategy=strategy, kind="sparse_rates", causal=causal, n=13, layout="zigzag",
                   hq=6, hkv=3, dtype=dtype)
              for strategy, dtype, causal in [("all_gather", "float32", False),
                                              ("all_gather", "float32", True), ("auto", "float64", False)]]
    return _sweep(rank, world, cases)


def sparse_w3(rank, world):
    # N = 4: contiguous leaves rank 2 empty; zigzag gives rank 0 one position.
    cases = _cases(KINDS, (4, 22), ((6, 3),))
    cases += _cases(("dilated_capped", "sparse_rates"), (37,), ((4, 2),), layouts=("zigzag",))
    return _sweep(rank, world, cases)


def fixed_positions(rank, world):
    """Bytes received by one call with 8 positions per rank (N = 8W), contiguous, for a config
    whose segments span two shards, and for configs whose segments tile them; then, on 4 ranks,
    a few exact cases."""
    spec_name = {"spans": "sparse_fixed", "tiles": "sparse_aligned"}
    calls = _count_exchanges()
    gen = torch.Generator().manual_seed(0)
    n = 8 * world
    full = [torch.randn(2, h, n, e, generator=gen, dtype=torch.float64) for h, e in ((4, 4), (2, 4), (2, 3))]
    received = {}
    for name, causal in itertools.product(spec_name, (False, True)):
        shards = [shard_sequence(x).clone().requires_grad_() for x in full]
        counters["dilated_compile"][_BYTES] = 0
        calls[0] = 0
        with sequence_parallel(strategy="all_gather"), dilated(SPECS[spec_name[name]]):
            out = F.scaled_dot_product_attention(*shards, is_causal=causal, enable_gqa=True)
        out.sum().backward()
        received[f"{name} causal={causal}"] = [counters["dilated_compile"][_BYTES], calls[0]]
    exact = _cases(("sparse_fixed", "sparse_rates"), (29,), ((4, 2),), layouts=("zigzag",))
    exact = exact if world > 3 else []
    return {"received": received, "exact": _sweep(rank, world, exact)}
