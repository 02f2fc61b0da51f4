"""The library's modules inside ``sequence_parallel`` on three spawned gloo ranks, one of them
empty, equal the single-process module on the whole sequence (outputs, input and parameter
gradients; float64), each rank's rows at their global positions; ``sequence_positions``; and what
the modules refuse inside the context (tests/sequence_parallel_modules_worker.py; two ranks:
tests/test_sequence_parallel.py::test_modules_with_position_embeddings_use_global_positions)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from sequence_parallel_worker import run_group  # noqa: E402

pytestmark = pytest.mark.slow  # spawns processes


def test_modules_on_three_ranks_positions_and_refusals(tmp_path):
    results = run_group("sequence_parallel_modules_worker:modules_w3", 3, str(tmp_path))
    cases = [{k: v for k, v in r.items() if k.startswith("{")} for r in results]
    assert cases[0] == cases[1] == cases[2] and set(cases[0].values()) == {"ok"} and len(cases[0]) == 3
    # zigzag over 3 ranks: chunks of ceil(N / 6); rank r holds chunks r and 5 - r.
    assert [r["zigzag 12"] for r in results] == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    assert [r["zigzag 10"] for r in results] == [[0, 1], [2, 3, 8, 9], [4, 5, 6, 7]]
    assert [r["contiguous 7"] for r in results] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [r["given n"] for r in results] == [r["zigzag 10"] for r in results]
    for key, words in [("mismatch", "not the 'contiguous' layout"), ("mask", "key_padding_mask"),
                       ("cache", "KV cache"), ("decode", "KV cache"), ("start", "start=4")]:
        assert results[0][key] == results[1][key] == results[2][key], key
        assert words in results[0][key], (key, results[0][key])
    assert [r["functional"] for r in results] == [True] * 3
    for key in ("masked", "attend"):
        assert results[0][key] == results[1][key] == results[2][key], key
        assert results[0][key].startswith("NotImplementedError") and "shard" in results[0][key], key
    assert results[0]["mask"].startswith("NotImplementedError")
    assert results[0]["start"].startswith("ValueError")
    assert [r["after"] for r in results] == [[1, 1, 8], [1, 2, 8], [1, 2, 8]]
