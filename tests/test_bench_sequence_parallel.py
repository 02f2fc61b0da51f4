"""benchmarks/bench_sequence_parallel.py runs (CPU, gloo, two ranks, tiny sizes): every row is
checked against the single-process op before it is timed, and the table is printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from sequence_parallel_worker import run_torchrun  # noqa: E402

pytestmark = pytest.mark.slow  # spawns processes

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_and_checks_every_row_on_two_cpu_ranks():
    done = run_torchrun(ROOT / "benchmarks" / "bench_sequence_parallel.py", "--smoke", "--patterns",
                        "dilated_hg", "block_sparse_local")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| dilated_hg")
            or line.startswith("| block_sparse_local")]
    # head_groups: all_gather and all_to_all; block-sparse: every strategy.
    assert len(rows) == 5, done.stdout
    for row in rows:
        error = float(row.split("|")[6])
        assert error < 1e-5, row
