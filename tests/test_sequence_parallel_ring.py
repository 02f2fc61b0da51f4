"""The ring strategy for block-sparse attention: exactness on patterns whose far chunks shrink
(band, global + random, explicit layouts), the traffic formula of ``distributed/ring.py``, and
the ``"auto"`` rule's fallback to ring.

``ring_all`` runs every case on one group of 3 spawned gloo ranks (``sequence_parallel_worker.
run_group``; starting a group costs more than its cases), once for the module's tests.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from sequence_parallel_worker import SPECS, run_case, run_group  # noqa: E402

from dilated_compile import BlockSparseSpec, block_sparse, sequence_parallel, shard_sequence  # noqa: E402
from dilated_compile.distributed.layout import chunk_ranges  # noqa: E402
from dilated_compile.testing import block_layout  # noqa: E402

# An explicit per-head layout of 13 x 13 blocks (the same on every rank: a fixed generator), and
# one with empty rows and no diagonal.
_LAYOUT = torch.rand(4, 13, 13, generator=torch.Generator().manual_seed(7)) > 0.6
_SPARSE = torch.zeros(1, 13, 13, dtype=torch.bool)
_SPARSE[0, 5, 1] = _SPARSE[0, 9, 2] = _SPARSE[0, 2, 11] = _SPARSE[0, 12, 0] = True

RING_SPECS = {
    "bs_band": BlockSparseSpec(2, local_blocks=1),
    "bs_global_random": BlockSparseSpec(2, local_blocks=0, global_blocks=1, random_blocks=2, seed=5),
    "bs_explicit": BlockSparseSpec(3, local_blocks=None, layout=_LAYOUT),
    "bs_explicit_band": BlockSparseSpec(3, local_blocks=1, random_blocks=1, seed=1, layout=_SPARSE),
    "bs_sparse": BlockSparseSpec(3, local_blocks=None, layout=_SPARSE),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ring_all``'s results, by rank."""
    return run_group("test_sequence_parallel_ring:ring_all", 3, str(tmp_path_factory.mktemp("ring")))


# -- on the ranks ---------------------------------------------------------------------------------

def ring_exactness(rank, world):
    """``run_case`` (outputs and every shard's gradients against the float64 dense reference) for
    ring over the patterns above: both layouts, causal or not, GQA, masks, lengths that leave
    ranges unaligned to the blocks and a rank empty, float32."""
    SPECS.update(RING_SPECS)
    cases = []
    for layout, kind, causal, n in itertools.product(
            ("contiguous", "zigzag"), RING_SPECS, (False, True), (37, 4)):
        cases.append(dict(kind=kind, causal=causal, n=n, layout=layout, hkv=2))
    for layout, kind, mask in itertools.product(
            ("contiguous", "zigzag"), ("bs_band", "bs_global_random", "bs_explicit"),
            ("bool", "float", "keypad")):
        cases.append(dict(kind=kind, causal=False, n=29, layout=layout, hkv=1, mask=mask))
    cases.append(dict(kind="bs_global_random", causal=True, n=31, layout="zigzag", hkv=2,
                      dtype="float32"))
    results = {}
    for case in cases:
        results[repr(case)] = run_case(rank, world, strategy="ring", **case)
    return results


def ring_traffic(rank, world):
    """Bytes the ring receives (forward, backward) for one call of each traffic case."""
    from torch._dynamo.utils import counters

    results = {}
    for name, (kind, causal, layout, n) in TRAFFIC_CASES.items():
        spec = RING_SPECS.get(kind)
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(1, h, n, e, generator=gen, dtype=torch.float64)
                for h, e in ((2, 4), (1, 4), (1, 3))]
        shards = [shard_sequence(x, layout=layout).clone().requires_grad_() for x in full]
        counters.clear()
        with sequence_parallel(layout=layout, strategy="ring"):
            if spec is None:
                out = F.scaled_dot_product_attention(*shards, is_causal=causal, enable_gqa=True)
            else:
                with block_sparse(spec):
                    out = F.scaled_dot_product_attention(*shards, is_causal=causal, enable_gqa=True)
        forward = counters["dilated_compile"]["sequence_parallel_bytes_ring"]
        out.sum().backward()
        results[name] = [forward, counters["dilated_compile"]["sequence_parallel_bytes_ring"] - forward]
    return results


def ring_auto(rank, world):
    """``"auto"`` on non-causal block-sparse calls that all_to_all cannot serve (a mask, heads
    that do not split over the ranks) runs the ring (its counter moves), exactly."""
    from torch._dynamo.utils import counters

    SPECS.update(RING_SPECS)
    served = {}
    for name, case in {"mask": dict(mask="bool", hq=3, hkv=1), "heads": dict(hq=4, hkv=2)}.items():
        counters.clear()
        result = run_case(rank, world, strategy="auto", kind="bs_band", causal=False, n=23,
                          layout="contiguous", **case)
        served[name] = [result, counters["dilated_compile"]["sequence_parallel_bytes_ring"] > 0]
    return served


def ring_all(rank, world):
    return {"exactness": ring_exactness(rank, world), "traffic": ring_traffic(rank, world),
            "auto": ring_auto(rank, world)}


# -- the formula, straight from the definitions ---------------------------------------------------

# name: (pattern, causal, layout, N); B = 1, Hq = 2, Hkv = 1, D = 4, Dv = 3, float64.
TRAFFIC_CASES = {
    "dense": ("dense", False, "contiguous", 48),
    "band": ("bs_band", False, "contiguous", 48),
    "band_causal_zigzag": ("bs_band", True, "zigzag", 37),
    "global_random": ("bs_global_random", False, "zigzag", 37),
    "explicit": ("bs_explicit_band", False, "contiguous", 37),
    "dense_causal": ("dense", True, "contiguous", 13),
}


def expected_rows(spec, heads, n, world, layout, causal) -> list[tuple[int, int]]:
    """Per rank: (rows received forward, gradient rows received backward) by the formula of
    ``distributed/ring.py``: ``sum_t |S_t(r - t)|`` and ``sum_t |G_t(r - 1 - t)|``, with
    ``need(r, s)`` the positions of ``s`` that a query position of ``r`` attends at block
    granularity (its block pair kept, the key not after the query when causal)."""
    bs = 1 if spec is None else spec.block_size
    kept = None if spec is None else block_layout(spec, heads, n, is_causal=causal).any(0)
    positions = [[p for a, b in chunk_ranges(n, world, layout, r) for p in range(a, b)]
                 for r in range(world)]

    def need(r, s):
        return {p for p in positions[s] for x in positions[r]
                if (kept is None or kept[x // bs, p // bs]) and (not causal or p <= x)}

    def union(s, us):
        return set().union(*(need((s + u) % world, s) for u in us))

    return [(sum(len(union((r - t) % world, range(t, world))) for t in range(1, world)),
             sum(len(union((r - 1 - t) % world, range(1, t + 1))) for t in range(1, world)))
            for r in range(world)]


# -- the tests ------------------------------------------------------------------------------------

def test_ring_block_sparse_is_exact_on_three_ranks(ranks):
    results = [r["exactness"] for r in ranks]
    assert results[0] == results[1] == results[2]
    assert set(results[0].values()) == {"ok"} and len(results[0]) == 59


def test_ring_traffic_follows_the_formula_and_skips_empty_blocks(ranks):
    results = [r["traffic"] for r in ranks]
    row = 1 * 1 * (4 + 3) * 8  # B * Hkv * (D + Dv) * itemsize; the gradients are float64 too
    for name, (kind, causal, layout, n) in TRAFFIC_CASES.items():
        rows = expected_rows(RING_SPECS.get(kind), 2, n, 3, layout, causal)
        assert [r[name] for r in results] == [[f * row, (f + g) * row] for f, g in rows], name
    # Dense non-causal: each rank receives the others' positions, N - n_r = 32 rows, and the
    # gradients of all but the previous rank's, N - n_{r-1} = 32 rows.
    assert [r["dense"] for r in results] == [[32 * row, 64 * row]] * 3
    # A band of one block of 2 on 16 positions per rank: a rank needs one block from each
    # neighbour (2 rows), so each hop carries 2 or 4 rows instead of 16, and the chunk of rank 0
    # is dropped after its first hop (rank 2 needs none of it): 4 rows per rank each way.
    assert [r["band"] for r in results] == [[4 * row, 8 * row]] * 3


def test_auto_runs_ring_for_non_causal_block_sparse_that_all_to_all_cannot_serve(ranks):
    assert [r["auto"] for r in ranks] == [{"mask": ["ok", True], "heads": ["ok", True]}] * 3


def test_choose_strategy_for_block_sparse_and_dilated():
    from dilated_compile import DilatedSpec
    from dilated_compile.distributed.attention import choose_strategy
    from dilated_compile.distributed.plan import Plan

    band = Plan(RING_SPECS["bs_band"], None, 0, 2, "contiguous", 16, False, None)
    assert choose_strategy("auto", band, 4, False) == "all_to_all"
    assert choose_strategy("auto", band, 4, True) == "ring"
    assert choose_strategy("auto", band, 3, False) == "ring"
    assert choose_strategy("ring", band, 4, True) == "ring"
    causal = Plan(RING_SPECS["bs_band"], None, 0, 2, "contiguous", 16, True, None)
    assert choose_strategy("auto", causal, 4, True) == "all_gather"
    dilated = Plan(DilatedSpec((4,), (1,)), None, 0, 2, "contiguous", 16, False, None)
    with pytest.raises(ValueError, match="not dilated attention; use strategy='all_gather'"):
        choose_strategy("ring", dilated, 4, False)
