"""A rank that exits: the others fail within the process group's timeout with an error naming
the collective, chained to the backend's (tests/sequence_parallel_failures_worker.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from sequence_parallel_failures_worker import TIMEOUT_S  # noqa: E402
from sequence_parallel_worker import run_group  # noqa: E402

pytestmark = pytest.mark.slow  # spawns processes


def test_a_rank_that_exits_fails_the_others_naming_the_collective(tmp_path):
    results = run_group("sequence_parallel_failures_worker:rank_exits", 3, str(tmp_path), timeout=120)
    assert results[1] is None and results[2] is None  # they exited
    named = {
        "all_gather": "sequence_parallel: the all-gather of keys and values (strategy 'all_gather') "
                      "failed on rank 0 of 2",
        "signature": "sequence_parallel: the signature check",
        "gather_sequence": "gather_sequence: the all-gather of the ranks' local lengths failed on "
                           "rank 0 of 2",
        "sequence_positions": "sequence_positions: the all-gather of the ranks' local lengths",
    }
    for case, words in named.items():
        failure = results[0][case]
        assert failure["collective"] and failure["type"] == "CollectiveError", failure
        assert failure["message"].startswith(words), failure["message"]
        assert "a rank may have exited" in failure["message"] and "0:00:05" in failure["message"]
        assert failure["cause"] in ("RuntimeError", "DistBackendError"), failure
        assert failure["seconds"] < TIMEOUT_S + 5, failure


def test_a_rank_that_exits_before_the_backward_fails_the_other_naming_the_collective(tmp_path):
    results = run_group("sequence_parallel_failures_worker:rank_exits_before_backward", 2, str(tmp_path),
                        timeout=120)
    assert results[1] is None
    failure = results[0]["backward"]
    assert failure["collective"] and failure["type"] == "CollectiveError", failure
    assert failure["message"].startswith(
        "sequence_parallel: the all-gather of keys and values (strategy 'all_gather'), backward failed "
        "on rank 0 of 2"), failure["message"]
    assert failure["seconds"] < TIMEOUT_S + 5, failure
