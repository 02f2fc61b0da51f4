"""examples/train_sequence_parallel.py: LongNetLM with its sequences sharded over the ranks and its
weights sharded with FSDP2 (gloo on CPU). It runs under torchrun, and one step's global loss and
gradients equal the single-process model's on the whole sequences
(tests/sequence_parallel_example_worker.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from sequence_parallel_worker import run_group, run_torchrun  # noqa: E402

pytestmark = pytest.mark.slow  # spawns processes

ROOT = Path(__file__).resolve().parent.parent


def test_example_trains_under_torchrun():
    done = run_torchrun(ROOT / "examples" / "train_sequence_parallel.py", "--tiny", "--steps", "2",
                        "--log-every", "1", "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", done.stdout)]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), done.stdout
    assert "2 ranks (gloo)" in done.stdout and "FSDP2" in done.stdout
    assert "Warning" not in done.stderr, done.stderr


def test_one_step_equals_the_single_process_model(tmp_path):
    results = run_group("sequence_parallel_example_worker:one_step", 2, str(tmp_path))
    assert results[0]["loss"] == results[1]["loss"]
    assert [r["local length"] for r in results] == [24, 26]
    assert results[0]["parameters"] > 10
