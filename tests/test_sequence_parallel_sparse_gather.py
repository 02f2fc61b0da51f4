"""LongNet's sparse all-gather: ``sequence_parallel(strategy="all_gather")`` with a dilated
pattern exchanges only the key/value rows each rank's queries attend.

The plan is checked on its own for many lengths, group sizes, layouts and head counts (what each
rank receives is exactly what its rows attend on other ranks, within the documented bound, and
every rank's sends match the others' receives); spawned gloo groups of 1-4 ranks check outputs
and gradients of every shard against the float64 dense reference and the bytes each call
receives against the same count.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from sequence_parallel_worker import SPECS, run_group  # noqa: E402
from sparse_gather_worker import ROW_ELEMENTS, attended_rows  # noqa: E402  (registers its specs)

from dilated_compile import DilatedSpec  # noqa: E402
from dilated_compile.distributed.plan import Plan  # noqa: E402
from dilated_compile.distributed.sparse_all_gather import sparse_plan  # noqa: E402
from dilated_compile.ops._pattern import head_parts  # noqa: E402

CPU = torch.device("cpu")


def bound_rows(spec: DilatedSpec, n: int, layout: str, hq: int, hkv: int, causal: bool) -> int:
    """The documented bound on the rows one rank receives (independent of N for fixed configs):
    ``R * (2, causal: 1) * sum_h sum_i m_hi * floor((w'_i - 1) / r_i)``."""
    ranges, sides = (1 if layout == "contiguous" else 2), (1 if causal else 2)
    group = hq // hkv
    total = 0
    for h in range(hkv):
        for part in head_parts(spec.segment_lengths, spec.dilation_rates, spec.mode, hq):
            heads = range(hq)[part.heads]
            if any(h * group <= q < (h + 1) * group for q in heads):  # one of m_hi's offsets
                total += (min(part.segment_length, n) - 1) // part.dilation_rate
    return ranges * sides * total


def _plans(spec, n, world, layout, causal, hq, hkv):
    return [sparse_plan(Plan(spec, None, rank, world, layout, n, causal, None), hq, hkv, CPU)
            for rank in range(world)]


SPEC_CASES = [SPECS[k] for k in ("dilated", "dilated_capped", "head_groups", "dilated_short",
                                  "sparse_rates", "sparse_head_groups")]
SPEC_CASES += [DilatedSpec((7,), (3,)), DilatedSpec((16,), (4,))]  # offsets past short segments


@pytest.mark.parametrize("spec", SPEC_CASES, ids=lambda s: s.to_json())
def test_each_rank_receives_exactly_the_rows_it_attends_within_the_bound(spec):
    for n, world, layout, causal, (hq, hkv) in itertools.product(
            (1, 5, 13, 37), (1, 2, 3, 4), ("contiguous", "zigzag"), (False, True),
            ((4, 2), (6, 3), (3, 1))):
        if hq < spec.num_configs and spec.mode == "head_groups":
            continue
        plans = _plans(spec, n, world, layout, causal, hq, hkv)
        where = (n, world, layout, causal, hq, hkv)
        received = [sum(p.receive_sizes) for p in plans]
        for rank, plan in enumerate(plans):
            assert received[rank] == attended_rows(spec, n, world, layout, rank, hq, hkv, causal), where
            assert received[rank] <= bound_rows(spec, n, layout, hq, hkv, causal), where
            for other in range(world):  # what a rank sends is what the other expects from it
                assert plan.send_sizes[other] == plans[other].receive_sizes[rank], where
            assert plan.send.numel() == sum(plan.send_sizes)
        # One decision on every rank: exchange when some rank needs a row, else no collective.
        assert {p.exchange for p in plans} == {sum(received) > 0}, where


def test_traffic_does_not_grow_with_n_for_fixed_positions_per_rank():
    """With 8 positions per rank and N = 8W: segments of 16 span two shards, so ranks receive
    the same rows for every W (the pattern repeats every two ranks); segments of 2 and 4 tile
    the shards, and no rank receives anything (no collective at all)."""
    spans, tiles = SPECS["sparse_fixed"], SPECS["sparse_aligned"]  # (4, 16), (1, 2); (2, 4), (1, 2)
    for causal in (False, True):
        pair = [sum(p.receive_sizes) for p in _plans(spans, 16, 2, "contiguous", causal, 4, 2)]
        assert min(pair) >= 0 and max(pair) > 0
        for world in (4, 8, 16):
            n = 8 * world
            plans = _plans(spans, n, world, "contiguous", causal, 4, 2)
            assert [sum(p.receive_sizes) for p in plans] == [pair[r % 2] for r in range(world)]
            assert max(pair) <= bound_rows(spans, n, "contiguous", 4, 2, causal)
            tiled = _plans(tiles, n, world, "contiguous", causal, 4, 2)
            assert not any(p.exchange for p in tiled) and not any(sum(p.receive_sizes) for p in tiled)
        # Zigzag, chunks of 4 and segments of 8: every rank holds one even and one odd chunk.
        zigzag = DilatedSpec((8,), (2,))
        counts = {sum(p.receive_sizes)
                  for w in (2, 4, 8) for p in _plans(zigzag, 8 * w, w, "zigzag", causal, 4, 2)}
        assert len(counts) == 1 and counts != {0}


def test_the_plan_is_built_once_per_call_class():
    plan = Plan(SPECS["dilated"], None, 1, 3, "zigzag", 37, False, None)
    first = sparse_plan(plan, 6, 3, CPU)
    assert sparse_plan(Plan(SPECS["dilated"], None, 1, 3, "zigzag", 37, False, None), 6, 3, CPU) is first
    assert sparse_plan(Plan(SPECS["dilated"], None, 1, 3, "zigzag", 37, True, None), 6, 3, CPU) is not first


# -- spawned groups ---------------------------------------------------------------------------------

@pytest.fixture
def run(tmp_path):
    return lambda name, world: run_group(f"sparse_gather_worker:{name}", world, str(tmp_path))


def _check_group(results: list[dict]) -> None:
    """Every case ok on every rank; one decision per case on every rank (the collective runs on
    all of them, or on none when no rank receives a row)."""
    for key in results[0]:
        outcomes = [r[key] for r in results]
        assert all(o[0] == "ok" for o in outcomes), key
        calls = {o[2] for o in outcomes}
        assert calls == {int(sum(o[1] for o in outcomes) > 0)}, key


def test_one_rank_computes_every_case_without_a_collective(run):
    (results,) = run("sparse_w1", 1)
    _check_group([results])
    assert all(o[1:] == [0, 0] for o in results.values())
    assert len(results) == 100


def test_exact_on_two_ranks_with_the_documented_traffic(run):
    results = run("sparse_w2", 2)
    _check_group(results)
    aligned = [k for k in results[0] if '"sparse_aligned"' in k]
    assert aligned and all(r[k][1:] == [0, 0] for r in results for k in aligned)
    assert sum(r[k][1] for r in results for k in r) > 0


def test_exact_on_three_ranks_with_an_empty_rank(run):
    _check_group(run("sparse_w3", 3))


def test_traffic_is_the_same_for_twice_the_ranks_and_length(run):
    two, four = run("fixed_positions", 2), run("fixed_positions", 4)
    assert len(four[0]["exact"]) == 10
    _check_group([r["exact"] for r in four])
    for rank, result in enumerate(four):
        assert result["received"] == two[rank % 2]["received"]
    for causal in (False, True):
        assert all(r["received"][f"tiles causal={causal}"] == [0, 0] for r in two)
        spans = [r["received"][f"spans causal={causal}"] for r in two]
        assert max(b for b, _ in spans) > 0 and all(calls == 1 for _, calls in spans)
        for rank, (received, _) in enumerate(spans):  # the documented count, float64
            rows = attended_rows(SPECS["sparse_fixed"], 16, 2, "contiguous", rank, 4, 2, causal)
            assert received == rows * ROW_ELEMENTS * 8
