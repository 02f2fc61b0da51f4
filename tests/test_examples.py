import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_quickstart_prints_rewrites_and_a_small_error():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr  # a new user's demo runs clean
    assert "-> dilated_compile.dilated_attention DilatedSpec(" in done.stdout
    error = float(done.stdout.split("float64 dense reference| =")[1].split()[0])
    assert error < 1e-5
