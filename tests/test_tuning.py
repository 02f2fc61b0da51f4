"""Kernel config selection: the shipped table of tuned configs, nearest-key lookup, the modes of
DILATED_COMPILE_AUTOTUNE. (Which config runs never changes results; the GPU tests cover that.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from dilated_compile.ops._triton import block_sparse_attention, dilated_attention, tuning  # noqa: E402, F401
from test_triton_kernels import _Recorder  # noqa: E402


def _config(m, n, warps, stages):
    return {"kwargs": {"BLOCK_M": m, "BLOCK_N": n}, "num_warps": warps, "num_stages": stages}


def test_every_kernel_is_registered_once_by_family_and_dtype():
    names = set(tuning.REGISTRY)
    assert {"dilated_fwd", "dilated_fwd_fp32", "dilated_bwd_dq", "dilated_bwd_dkdv"} <= names
    assert {"block_sparse_fwd_bs128", "block_sparse_bwd_dkdv_bs64_fp32"} <= names
    assert len({id(a) for a in tuning.REGISTRY.values()}) == len(names)


def test_tuning_key_is_the_key_arguments_then_every_tensors_dtype():
    autotuner = tuning.REGISTRY["dilated_bwd_dq"]
    names = autotuner.arg_names
    args = [torch.empty(1, dtype=torch.bfloat16) if n in ("Q", "K", "V") else 0 for n in names[:3]]
    kwargs = {"rows_bucket": 2048, "HEAD_DIM": 64, "HEAD_DIM_V": 64, "IS_CAUSAL": True,
              "HAS_MASK": False, "QUERY_TAIL": False, "ACCUMULATE": True, "Lse": torch.empty(1)}
    key = tuning.tuning_key(autotuner, tuple(args), kwargs)
    assert key == (2048, 64, 64, True, False, False, True,
                   "torch.bfloat16", "torch.bfloat16", "torch.bfloat16", "torch.float32")
    assert tuning.key_text(key) == json.dumps(list(key))


def _dict_key(autotuner, args, kwargs):
    """Triton's autotuner's own way: a dict of every argument by name."""
    named = {**dict(zip(autotuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in autotuner.arg_names}
    key = [named[k] for k in autotuner.keys if k in named]
    return tuple(key + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


@pytest.mark.parametrize("name", sorted(tuning.REGISTRY))
def test_tuning_key_equals_the_autotuners_way_on_a_whole_launch(name):
    """Every registered kernel, called the way its launcher calls it: tensors and scalars
    positional, the constexprs by keyword."""
    autotuner = tuning.REGISTRY[name]
    if not hasattr(autotuner.fn, "params"):
        pytest.skip("under TRITON_INTERPRET=1 the kernels are interpreted functions")
    constexprs = {p.name for p in autotuner.fn.params if p.is_constexpr}
    positional = [n for n in autotuner.arg_names if n not in constexprs]
    dtypes = [torch.bfloat16, torch.float32, torch.uint8]
    args = tuple(torch.empty(1, dtype=dtypes[i % 3]) if n[0].isupper() else i
                 for i, n in enumerate(positional))
    kwargs = {n: (i % 2 == 0) for i, n in enumerate(autotuner.arg_names)
              if n in constexprs and n not in ("BLOCK_M", "BLOCK_N")}
    assert tuning.tuning_key(autotuner, args, kwargs) == _dict_key(autotuner, args, kwargs)


def test_closest_key_prefers_equal_flags_then_nearest_sizes():
    entries = {
        json.dumps([2048, 64, 64, False, "torch.bfloat16"]): _config(128, 64, 4, 3),
        json.dumps([512, 64, 64, False, "torch.bfloat16"]): _config(64, 64, 4, 3),
        json.dumps([1024, 64, 64, True, "torch.bfloat16"]): _config(128, 32, 4, 4),
    }
    assert tuning._closest(entries, (2048, 64, 64, False, "torch.bfloat16")) == _config(128, 64, 4, 3)
    assert tuning._closest(entries, (600, 64, 64, False, "torch.bfloat16")) == _config(64, 64, 4, 3)
    # A causal key takes the causal entry even though its size is further off.
    assert tuning._closest(entries, (4096, 64, 64, True, "torch.bfloat16")) == _config(128, 32, 4, 4)
    assert tuning._closest(entries, (1, 2)) is None
    assert tuning._closest({}, (2048,)) is None


def test_select_uses_one_shipped_config_on_a_known_gpu(monkeypatch):
    name = "dilated_fwd"
    autotuner = tuning.REGISTRY[name]
    chosen = _config(128, 128, 8, 3)
    table = {name: {json.dumps([2048, 64, 64, False, False, False, False, "torch.bfloat16"]): chosen}}
    monkeypatch.setattr(tuning, "_device_kernels", lambda index: table)
    monkeypatch.setattr(tuning, "_SELECTED", {})
    monkeypatch.setenv("DILATED_COMPILE_AUTOTUNE", "auto")
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    kwargs = {"rows_bucket": 4096, "HEAD_DIM": 64, "HEAD_DIM_V": 64, "IS_CAUSAL": False,
              "HAS_MASK": False, "QUERY_TAIL": False, "MERGE": True}
    kernel = tuning.select(name, cuda, (torch.empty(1, dtype=torch.bfloat16),), kwargs)
    assert kernel is not autotuner and len(kernel.configs) == 1
    config = kernel.configs[0]
    assert (config.kwargs, config.num_warps, config.num_stages) == (chosen["kwargs"], 8, 3)
    assert kernel.fn is autotuner.fn and list(kernel.keys) == list(autotuner.keys)
    # The same config gives the same kernel object (one compilation).
    assert tuning.select(name, cuda, (torch.empty(1, dtype=torch.bfloat16),), kwargs) is kernel
    # Autotuning forced on, or a GPU the table does not know: the autotuner itself.
    monkeypatch.setenv("DILATED_COMPILE_AUTOTUNE", "1")
    assert tuning.select(name, cuda, (torch.empty(1),), kwargs) is autotuner
    monkeypatch.setenv("DILATED_COMPILE_AUTOTUNE", "0")
    first = tuning.select(name, cuda, (torch.empty(1),), kwargs)
    assert len(first.configs) == 1 and first.configs[0].kwargs == autotuner.configs[0].kwargs
    monkeypatch.setenv("DILATED_COMPILE_AUTOTUNE", "auto")
    monkeypatch.setattr(tuning, "_device_kernels", lambda index: {})
    monkeypatch.setattr(tuning, "_SELECTED", {})
    assert tuning.select(name, cuda, (torch.empty(1),), kwargs) is autotuner
    assert tuning.select(name, torch.device("cpu"), (torch.empty(1),), kwargs) is autotuner


def test_a_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("DILATED_COMPILE_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="DILATED_COMPILE_AUTOTUNE must be one of"):
        tuning.autotune_mode()


def test_the_shipped_table_names_registered_kernels_and_their_candidates():
    """A stale table (a renamed kernel, a config no longer among the candidates) fails here."""
    table = json.loads(tuning.TABLE_PATH.read_text())["devices"]
    assert table, "the package ships tuned configs for at least one GPU"
    candidates = _candidates()
    for device, entry in table.items():
        assert {"capability", "triton", "torch", "kernels"} <= entry.keys(), device
        for kernel, keys in entry["kernels"].items():
            assert kernel in tuning.REGISTRY, (device, kernel)
            for key, config in keys.items():
                assert len(json.loads(key)) >= len(tuning.REGISTRY[kernel].keys), (kernel, key)
                assert set(config) == {"kwargs", "num_warps", "num_stages"}
                assert set(config["kwargs"]) == (
                    {"BLOCK_M", "BLOCK_N", "BY_QUERY"} if "bwd_dkdv" in kernel else {"BLOCK_M", "BLOCK_N"})
                assert _fields(config) in candidates[kernel], (device, kernel, key, config)


def _fields(config) -> tuple:
    return json.dumps(config["kwargs"], sort_keys=True), config["num_warps"], config["num_stages"]


def _candidates() -> dict[str, set]:
    return {name: {_fields(tuning.config_fields(c)) for c in autotuner.configs}
            for name, autotuner in tuning.REGISTRY.items()}


def test_retune_makes_only_the_named_kernels_autotune(monkeypatch):
    entry = _config(64, 64, 4, 3)
    key = json.dumps([2048, 64, 64, False, False, False, False, "torch.bfloat16"])
    table = {name: {key: entry} for name in ("dilated_fwd", "dilated_bwd_dkdv")}
    monkeypatch.setattr(tuning, "_device_kernels", lambda index: table)
    monkeypatch.setattr(tuning, "_SELECTED", {})
    monkeypatch.setattr(tuning, "_RETUNED", ())
    monkeypatch.setenv("DILATED_COMPILE_AUTOTUNE", "auto")
    cuda, args = torch.device("cuda", 0), (torch.empty(1, dtype=torch.bfloat16),)
    kwargs = {"rows_bucket": 2048, "HEAD_DIM": 64, "HEAD_DIM_V": 64, "IS_CAUSAL": False,
              "HAS_MASK": False, "QUERY_TAIL": False, "MERGE": False, "ACCUMULATE": False}
    for name in table:
        assert tuning.select(name, cuda, args, kwargs) is not tuning.REGISTRY[name]
    tuning.retune(("dilated_bwd",))
    assert tuning.select("dilated_bwd_dkdv", cuda, args, kwargs) is tuning.REGISTRY["dilated_bwd_dkdv"]
    assert tuning.select("dilated_fwd", cuda, args, kwargs) is not tuning.REGISTRY["dilated_fwd"]
    with pytest.raises(ValueError, match="no registered kernel name starts with"):
        tuning.retune(("dilated_bwd_dk_dv",))


def test_tune_refuses_an_unknown_kernel_prefix():
    env = {**os.environ, "DILATED_COMPILE_AUTOTUNE": "auto"}
    result = subprocess.run([sys.executable, "-m", "dilated_compile.tune", "--out", "unused.json",
                             "--kernels", "no_such_kernel"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "--kernels" in result.stderr and "no_such_kernel" in result.stderr
    assert not os.path.exists("unused.json")
    # A registered prefix is taken (the kernels are registered by then): on to the GPU check.
    result = subprocess.run([sys.executable, "-m", "dilated_compile.tune", "--out", "unused.json",
                             "--kernels", "dilated_bwd_dkdv"], capture_output=True, text=True,
                            env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "--kernels" not in result.stderr and "CUDA" in result.stderr


def test_tune_needs_a_gpu_and_says_so():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DILATED_COMPILE_AUTOTUNE": "auto"}
    result = subprocess.run([sys.executable, "-m", "dilated_compile.tune", "--out", "unused.json"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "CUDA" in result.stderr


def test_host_cost_script_runs():
    """benchmarks/host_cost.py stubs the launches through the launchers' internal names: it
    must keep finding them."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "host_cost.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DILATED_COMPILE_AUTOTUNE": "auto"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| mixture |" in done.stdout and "| head_groups |" in done.stdout


def test_shipped_table_holds_every_key_of_the_tuning_workload(monkeypatch):
    """Every launch of ``python -m dilated_compile.tune``'s default workload (both families, D 64
    and 128, bf16, causal and not, forward and backward) finds its exact key in the shipped
    table: a kernel whose arguments change (another tensor, another dtype) changes its keys, and
    without this the H200 would silently fall back to the nearest key or to autotuning."""

    seen = set()

    def record(name, grid, *args, **kwargs):
        seen.add((name, tuning.key_text(tuning.tuning_key(tuning.REGISTRY[name], args, kwargs))))

    def delta(grad_out, *rest):
        return grad_out[..., 0].float()

    families = (dilated_attention, block_sparse_attention)
    for module in families:
        monkeypatch.setattr(module, "launch_tuned", record)
        monkeypatch.setattr(module, "launch_delta", delta)
    monkeypatch.setattr(block_sparse_attention, "_launcher", lambda kernel: _Recorder(kernel, set()))
    segments, rates = [2048, 4096, 8192, 16384], [1, 2, 4, 8]
    layouts = [(4, 0, 0), (1, 2, 3)]  # tune's block-sparse "local" and "bigbird"
    for d in (64, 128):
        q = torch.randn(1, 16, 300, d, dtype=torch.bfloat16)
        lse = q[..., 0].float()
        for causal in (False, True):
            for mode in ("mixture", "head_groups"):
                args = (segments, rates, mode, causal, 0.125)
                dilated_attention.forward(q, q, q, *args)
                dilated_attention.backward(q, q, q, q, q, lse, None, *args)
            for local, global_, random in layouts:
                args = (128, local, global_, random, 0, None, causal, 0.125)
                block_sparse_attention.forward(q, q, q, *args)
                block_sparse_attention.backward(q, q, q, q, q, lse, None, *args)
    table = json.loads(tuning.TABLE_PATH.read_text())["devices"]["NVIDIA H200"]["kernels"]
    assert len(seen) >= 40
    missing = [(name, key) for name, key in sorted(seen) if key not in table.get(name, {})]
    assert not missing, missing
