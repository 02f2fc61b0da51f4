"""Sequence-parallel attention on CPU over gloo: spawned process groups of 1, 2 and 3 ranks, each
running many cases (tests/sequence_parallel_worker.py) against the float64 dense reference. A
group that outlives its timeout fails the test (a hang is a failure, never a stuck suite)."""

from __future__ import annotations

import math

import pytest
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from sequence_parallel_worker import run_group  # noqa: E402


@pytest.fixture
def run(tmp_path):
    return lambda name, world: run_group(name, world, str(tmp_path))


def test_shard_gather_round_trip_and_gradient_and_traffic(run):
    results = run("shard_gather", 3)
    messages = [r["error"] for r in results]
    assert len(set(messages)) == 1 and "not the 'contiguous' layout" in messages[0]
    # The per-rank traffic formulas of docs/sequence_parallel.md (zigzag: c = 2 * ceil(N / 2W)).
    w, b, hq, hkv, d, dv, n, s = 3, 2, 6, 3, 4, 3, 13, 8
    c = 2 * math.ceil(n / (2 * w))
    kv_block = c * b * hkv * (d + dv) * s
    expected = {
        "all_gather": [(w - 1) * kv_block, 0],  # its backward (a reduce-scatter) is not counted
        "all_to_all": [(w - 1) * c * b * (hq * d + hkv * (d + dv)) * s // w
                       + (w - 1) * c * b * hq * dv * s // w, 0],
    }
    # Ring: only the rows that ranks ahead need (distributed/ring.py; causal, so rank 0, whose
    # queries are [0, 3), needs no other chunk); (forward rows, backward gradient rows) per rank,
    # checked against the formula for more patterns in test_sequence_parallel_ring.py.
    row = b * hkv * (d + dv) * s
    ring = [[f * row, (f + g) * row] for f, g in ((6, 6), (9, 3), (6, 9))]
    for rank, result in enumerate(results):
        assert result["traffic"] == {**expected, "ring": ring[rank]}


def test_exact_two_ranks(run):
    results = run("exactness_w2", 2)
    assert results[0].keys() == results[1].keys()
    # The same cases raised on both ranks, with the same message.
    assert results[0] == results[1]
    assert sum(r == "ok" for r in results[0].values()) > 100


def test_exact_three_ranks_with_an_empty_rank(run):
    results = run("exactness_w3", 3)
    assert results[0] == results[1] == results[2]


def test_exact_one_rank(run):
    results = run("exactness_w1", 1)[0]
    # 36 cases; ring raises for the 4 dilated, all_gather for the 2 non-causal block-sparse.
    assert sum(r == "ok" for r in results.values()) == 30


def test_mismatched_calls_raise_the_same_error_on_every_rank(run):
    per_rank = run("mismatches", 2)
    for field, words in [("length", "positions"), ("heads", "query heads"),
                         ("dtype", "rank 0: torch.float64, rank 1: torch.float32"), ("spec", "spec"),
                         ("causal", "is_causal"), ("strategy", "rank 0: ring, rank 1: all_gather")]:
        assert per_rank[0][field] == per_rank[1][field], field
        assert per_rank[0][field].startswith("ValueError") and words in per_rank[0][field], field
    assert all(r["dropout"].startswith("NotImplementedError: dropout_p=0.1") for r in per_rank)
    assert "rank(s) [0]" in per_rank[1]["invalid"]
    assert per_rank[0]["invalid"] != "no error"
    assert "all_to_all" in per_rank[0]["bs_all_gather"]
    assert "all_gather" in per_rank[0]["dilated_ring"]


def test_compiled_equals_eager(run):
    assert run("compiled", 2) == ["ok", "ok"]


def test_modules_with_position_embeddings_use_global_positions(run):
    """MultiheadDilatedAttention with rotary or xPos positions inside sequence_parallel rotates
    each rank's rows by their global positions: outputs, input and parameter gradients equal the
    single-process module on the whole sequence; so do LongNetLM and LongNet (three ranks and
    the refusals: tests/test_sequence_parallel_modules.py)."""
    results = run("sequence_parallel_modules_worker:modules_w2", 2)
    assert results[0] == results[1] and set(results[0].values()) == {"ok"} and len(results[0]) == 9


def test_all_to_all_reuses_a_ranks_layout_across_calls():
    """The rank's explicit layout is one tensor per pattern and length (so the op's index cache
    hits), rebuilt when the spec's layout changes in place; and it is the rank's heads of the
    whole sequence's blocks."""
    import torch

    from dilated_compile import BlockSparseSpec
    from dilated_compile.distributed.all_to_all import _rank_spec
    from dilated_compile.distributed.plan import Plan
    from dilated_compile.testing import block_layout

    spec = BlockSparseSpec(16, local_blocks=1, random_blocks=2, seed=4)
    plan = Plan(spec, None, 1, 2, "contiguous", 150, False, None)
    first = _rank_spec(plan, 4, torch.device("cpu"))
    assert _rank_spec(plan, 4, torch.device("cpu")) is first
    assert torch.equal(first.layout, block_layout(spec, 4, 150)[2:4])

    layout = torch.zeros(1, 10, 10, dtype=torch.bool)
    explicit = BlockSparseSpec(16, local_blocks=None, random_blocks=1, layout=layout)
    plan = Plan(explicit, None, 0, 2, "contiguous", 150, False, None)
    before = _rank_spec(plan, 4, torch.device("cpu"))
    layout[0, 3, 7] = True
    after = _rank_spec(plan, 4, torch.device("cpu"))
    assert after is not before and after.layout[:, 3, 7].all() and not before.layout[:, 3, 7].any()
