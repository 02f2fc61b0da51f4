"""Compiled-artifact caches never serve a graph compiled for another spec.

Inductor's FX graph cache keys on the graph it is given, not on node metadata. The annotation
is an op argument and the rewrite runs before Inductor, so the spec is part of every key. These
tests compile code that differs only in its spec, in one process and across processes sharing
one cache directory, and check each result against the float64 reference; they also check that
the cache is live (a same-spec run hits), so a pass cannot come from the cache being off.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

import dilated_compile
from dilated_compile import DilatedSpec, dilated
from dilated_compile.testing import dense_reference

pytestmark = pytest.mark.slow

SPEC_A = DilatedSpec((8, 16), (1, 2))
SPEC_B = DilatedSpec((8, 16), (2, 4), mode="head_groups")  # same shapes, other pattern


def _make_attend(spec):
    # Identical code for every spec: only the closed-over spec differs.
    def attend(q, k, v):
        with dilated(spec):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attend


def _check(fn, spec):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 8, generator=g) for _ in range(3))
    out = dilated_compile.compile(fn, fullgraph=True)(q, k, v)
    ref = dense_reference(q, k, v, spec, is_causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_two_specs_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with inductor_config.patch(fx_graph_cache=True):
        _check(_make_attend(SPEC_A), SPEC_A)
        torch._dynamo.reset()
        counters.clear()
        _check(_make_attend(SPEC_B), SPEC_B)
        assert counters["inductor"]["fxgraph_cache_hit"] == 0
        torch._dynamo.reset()
        counters.clear()
        _check(_make_attend(SPEC_A), SPEC_A)
        assert counters["inductor"]["fxgraph_cache_hit"] >= 1  # the cache is live


def _run_worker(spec, cache_dir):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    payload = json.dumps([list(spec.segment_lengths), list(spec.dilation_rates), spec.mode])
    worker = Path(__file__).with_name("cache_worker.py")
    done = subprocess.run(
        [sys.executable, str(worker), payload], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_specs_in_two_processes_sharing_a_cache_dir(tmp_path):
    first = _run_worker(SPEC_A, tmp_path)
    assert first["error"] < 1e-5 and first["misses"] >= 1

    other = _run_worker(SPEC_B, tmp_path)
    assert other["error"] < 1e-5
    assert other["hits"] == 0

    again = _run_worker(SPEC_A, tmp_path)
    assert again["error"] < 1e-5
    assert again["hits"] >= 1  # the cache is live and shared
