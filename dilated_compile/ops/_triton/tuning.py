"""Which config each kernel launch uses: shipped tuned configs, the autotuner, its disk cache.

Triton's autotuner benchmarks every candidate config at the first launch of each tuning key (a
shape class: head dims, causality, mask kind, dtypes and, for the dilated kernels, the rows per
segment), 20-90 s per class at long sequences. Three things keep a first call fast:

1. **Shipped configs.** ``tuned_configs.json`` (next to this file) holds, per GPU model, the
   config a tuning run (``python -m dilated_compile.tune``) picked for each kernel and key. On a
   GPU it knows — by name, else by compute capability — a launch uses that config with no
   benchmarking: the exact key's config, or for a key it has not seen the config of the nearest
   key of the same kernel (same flags and dtypes first, then the closest sizes). Only the chosen
   config is compiled.
2. **The disk cache.** Elsewhere the autotuner runs, with Triton's ``cache_results`` (when the
   installed Triton has it): the timings are stored under ``TRITON_CACHE_DIR``, keyed on the
   Triton version, the GPU target, the kernel source, the candidates and the tuning key, so a
   shape class is tuned once per machine.
3. ``DILATED_COMPILE_AUTOTUNE`` (read at each launch): ``auto`` (the default) as above; ``1`` always
   autotunes (the shipped table is ignored: re-tuning; ``retune`` does it for chosen kernels
   only); ``0`` launches each kernel's first candidate, never tuning (tests, debugging).
   ``DILATED_COMPILE_TUNED_CONFIGS=<path>`` reads another table (one written by
   ``python -m dilated_compile.tune --out <path>``).

The config never changes what a kernel computes, only how fast.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import triton

TABLE_PATH = Path(__file__).with_name("tuned_configs.json")
_TABLE_ENV = "DILATED_COMPILE_TUNED_CONFIGS"
_MODES = ("auto", "1", "0")

# name -> the kernel's autotuner (every tuned kernel of the package, for the tuning run).
REGISTRY: dict[str, Any] = {}


def autotune_mode() -> str:
    """``DILATED_COMPILE_AUTOTUNE``: ``"auto"`` (default), ``"1"`` or ``"0"``."""
    mode = os.environ.get("DILATED_COMPILE_AUTOTUNE", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"DILATED_COMPILE_AUTOTUNE must be one of {_MODES}, got {mode!r}")
    return mode


def tuned(name: str, kernel, configs: list, key: list[str], restore_value=None):
    """``kernel`` autotuned over ``configs`` on ``key`` (with the disk cache when Triton has
    it), registered as ``name`` for the tuning run and the shipped table."""
    options = {"restore_value": restore_value} if restore_value else {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True
    autotuner = triton.autotune(configs=configs, key=key, **options)(kernel)
    REGISTRY[name] = autotuner
    return autotuner


def tuning_key(autotuner, args: tuple, kwargs: dict) -> tuple:
    """The key Triton's autotuner files a launch under: the key arguments' values, then the
    dtype of every tensor argument, in argument order (positional, then keyword). Computed on
    every launch, so from positions worked out once per kernel rather than from a dict of its
    ~70 arguments (which cost ~50 us a launch)."""
    names, position = _arg_layout(autotuner)
    args = args[: len(names)]
    key = []
    for k in autotuner.keys:
        i = position.get(k)
        if i is not None and i < len(args):
            key.append(args[i])
        elif k in kwargs and k in position:
            key.append(kwargs[k])
    key += [str(v.dtype) for v in args if hasattr(v, "dtype")]
    key += [str(v.dtype) for k, v in kwargs.items()
            if k in position and position[k] >= len(args) and hasattr(v, "dtype")]
    return tuple(key)


@functools.cache
def _arg_layout(autotuner) -> tuple[tuple, dict]:
    names = tuple(autotuner.arg_names)
    return names, {name: i for i, name in enumerate(names)}


def key_text(key: tuple) -> str:
    """A key as the table stores it (JSON of the list)."""
    return json.dumps([v if isinstance(v, (bool, int, str)) else str(v) for v in key])


@functools.cache
def _table() -> dict:
    path = os.environ.get(_TABLE_ENV)
    path = Path(path) if path else TABLE_PATH
    if not path.is_file():
        if os.environ.get(_TABLE_ENV):
            raise FileNotFoundError(f"{_TABLE_ENV}={path}: no such file")
        return {}
    with open(path) as f:
        return json.load(f).get("devices", {})


@functools.cache
def _device_kernels(index: int) -> dict:
    """The table's kernels for CUDA device ``index``: by its name, else any entry tuned on the
    same compute capability (an H200's configs serve an H100: the same SM and shared memory)."""
    table = _table()
    name = torch.cuda.get_device_name(index)
    if name in table:
        return table[name]["kernels"]
    capability = list(torch.cuda.get_device_capability(index))
    for entry in table.values():
        if entry.get("capability") == capability:
            return entry["kernels"]
    return {}


def _distance(a: list, b: list) -> tuple[int, float]:
    """How far key ``a`` is from ``b``: differing non-size fields first, then log2 distance of
    the sizes."""
    mismatched, spread = 0, 0.0
    for x, y in zip(a, b):
        if x == y:
            continue
        sizes = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (x, y))
        if sizes:
            spread += abs(math.log2(x / y))
        else:
            mismatched += 1
    return mismatched, spread


def _closest(entries: dict, key: tuple) -> dict | None:
    text = key_text(key)
    if text in entries:
        return entries[text]
    wanted = json.loads(text)
    candidates = [(k, json.loads(k)) for k in entries]
    candidates = [(k, v) for k, v in candidates if len(v) == len(wanted)]
    if not candidates:
        return None
    best = min(candidates, key=lambda kv: _distance(wanted, kv[1]))
    return entries[best[0]]


@functools.cache
def _one_config(name: str, config_text: str):
    """An autotuner over the single config ``config_text``: Triton launches it without
    benchmarking (a key that is not cached and one candidate: nothing to compare)."""
    autotuner = REGISTRY[name]
    fields = json.loads(config_text)
    config = triton.Config(
        fields["kwargs"], num_warps=fields["num_warps"], num_stages=fields["num_stages"])
    return triton.autotune(configs=[config], key=list(autotuner.keys))(autotuner.fn)


def select(name: str, device: torch.device, args: tuple, kwargs: dict):
    """The kernel a launch of ``REGISTRY[name]`` on ``device`` with ``args``/``kwargs`` uses:
    ``auto``: a one-config kernel with the shipped config when the table has one for this GPU,
    else the autotuner; ``1``: the autotuner; ``0``: a one-config kernel with the first
    candidate. (Off CUDA — the interpreter — the kernel as built.)"""
    autotuner = REGISTRY[name]
    mode = autotune_mode()
    if device.type != "cuda" or mode == "1" or name.startswith(_RETUNED):
        return autotuner
    if mode == "0":
        return _one_config(name, json.dumps(config_fields(autotuner.configs[0]), sort_keys=True))
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = tuning_key(autotuner, args, kwargs)
    chosen = _SELECTED.get((name, index, key))
    if chosen is None:  # once per kernel, GPU and shape class: a launch then costs a lookup
        entry = _closest(_device_kernels(index).get(name, {}), key)
        chosen = autotuner if entry is None else _one_config(name, json.dumps(entry, sort_keys=True))
        _SELECTED[(name, index, key)] = chosen
    return chosen


# (kernel name, CUDA device index, tuning key) -> the kernel ``select`` picked.
_SELECTED: dict[tuple, Any] = {}
# Name prefixes of the kernels that autotune in ``auto`` mode even where the table has a config.
_RETUNED: tuple[str, ...] = ()


def retune(prefixes: tuple[str, ...]) -> None:
    """Make the kernels whose registered names start with one of ``prefixes`` autotune from now
    on, in ``auto`` mode too, while the others keep the table's configs (``python -m
    dilated_compile.tune --kernels``). Raises ``ValueError`` for a prefix no kernel has."""
    global _RETUNED
    unknown = [p for p in prefixes if not any(name.startswith(p) for name in REGISTRY)]
    if unknown:
        raise ValueError(f"no registered kernel name starts with {unknown}; the kernels are "
                         f"{sorted(REGISTRY)}")
    _RETUNED = tuple(prefixes)
    _SELECTED.clear()


def config_fields(config) -> dict:
    """A ``triton.Config`` as the table stores it."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def tuned_entries() -> dict[str, dict[str, dict]]:
    """What the registered autotuners chose in this process: name -> key text -> config."""
    return {name: {key_text(key): config_fields(config) for key, config in autotuner.cache.items()}
            for name, autotuner in REGISTRY.items() if autotuner.cache}
