import os

# One default config per Triton kernel: tuning each new shape class would dominate GPU test time.
os.environ.setdefault("DILATED_COMPILE_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Reproducible property tests in CI: the same examples every run, no wall-clock deadline
# (a first call may compile).
settings.register_profile("dilated_compile", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dilated_compile"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and counts only its own rewrites."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
