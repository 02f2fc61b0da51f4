"""The export targets on one CUDA GPU: AOTInductor packages and (when importable) Torch-TensorRT.

For a LongNet language model (``dilated_compile.nn.LongNetLM``, head dim 32 so the Triton kernels
run) exported with a dynamic sequence length, each experiment builds an artefact and checks it:

  aoti-kernels   aot_compile on CUDA, default decompose=False: the op's Triton kernels in the package
  aoti-decomp    aot_compile on CUDA with decompose=True: the aten decomposition, Inductor kernels
  tensorrt       dilated_compile.tensorrt.compile (skipped when torch_tensorrt is not importable)

AOTInductor packages are loaded in a fresh process that cannot import dilated_compile
(tests/export_worker.py) and run at several lengths; every artefact is compared with eager (which
runs the op's kernels) and timed at the longest length (CUDA events, median of 20 after warm-up).
Prints a table; exits non-zero if a check fails. Usage, from the repository root::

    python benchmarks/gpu_export_check.py                          # float32 and bfloat16
    python benchmarks/gpu_export_check.py --dtypes float32 --out /tmp/report
    python benchmarks/gpu_export_check.py --cxx g++-12    # C++ compiler for the packages
    python benchmarks/gpu_export_check.py --examples 1000 3000    # export from each length

``--cxx`` sets Inductor's ``cpp.cxx`` through ``aot_compile(inductor_configs=...)``; without it the
``CXX`` environment variable (or ``g++``) is used. See "Troubleshooting" in docs/export.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dilated_compile  # noqa: E402
from dilated_compile.nn import LongNetLM  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "export_worker.py")
LENGTHS = (2, 100, 1000, 4096, 8192)
MAX_LEN = 16384
# Largest error against eager that passes, per dtype (logits of order 1-10).
TOLERANCES = {torch.float32: 2e-3, torch.bfloat16: 1e-1, torch.float16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Experiment:
    target: str  # "aoti-kernels", "aoti-decomp" or "tensorrt"
    dtype: torch.dtype
    example: int  # length of the example input the model is exported from


@dataclasses.dataclass
class Result:
    experiment: Experiment
    status: str  # "ok", "FAIL" or "skipped: ..."
    build_s: float = 0.0
    max_error: float = float("nan")
    eager_ms: float = float("nan")
    artefact_ms: float = float("nan")
    size_mb: float = float("nan")
    detail: str = ""


DEVICE = "cuda"  # --device cpu: a smoke run of this script's own logic
CXX: str | None = None  # --cxx: the C++ compiler AOTInductor builds packages with


def _model(dtype: torch.dtype) -> LongNetLM:
    torch.manual_seed(0)
    model = LongNetLM(num_tokens=512, d_model=128, nhead=4, num_layers=2, dim_feedforward=512,
                      segment_lengths=(256, 512, 1024), dilation_rates=(1, 2, 4), num_kv_heads=2)
    return model.eval().to(device=DEVICE, dtype=dtype)


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _median_ms(fn, x, repeats: int = 20) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn(x)
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def _dynamic_shapes():
    return {"tokens": {1: torch.export.Dim("seq", min=2, max=MAX_LEN)}}


def _check_package(package: str, model, workdir: str) -> tuple[float, str]:
    inputs = [_tokens(n, seed=n) for n in LENGTHS]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    cases = os.path.join(workdir, "cases.pt")
    torch.save({"inputs": inputs, "expected": expected, "device": DEVICE}, cases)
    done = subprocess.run([sys.executable, WORKER, cases, "--aoti", package],
                          capture_output=True, text=True, timeout=540)
    if done.returncode == -signal.SIGSEGV:
        return float("inf"), "SIGSEGV loading the package (try --cxx g++-12): " + done.stderr[-1500:]
    if done.returncode:
        return float("inf"), done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["dilated_compile_imported"]:
        return float("inf"), "dilated_compile was imported by the package"
    return max(report["aoti"]), f"errors by length {dict(zip(LENGTHS, report['aoti']))}"


def run_experiment(experiment: Experiment, workdir: str) -> Result:
    model = _model(experiment.dtype)
    example = (_tokens(experiment.example),)
    result = Result(experiment, "ok")
    start = time.perf_counter()
    if experiment.target.startswith("aoti"):
        name = f"{experiment.target}-{str(experiment.dtype)[6:]}-{experiment.example}"
        path = os.path.join(workdir, name + ".pt2")
        package = dilated_compile.aot_compile(
            model, example, path, dynamic_shapes=_dynamic_shapes(),
            decompose=experiment.target == "aoti-decomp",
            inductor_configs={"cpp.cxx": CXX} if CXX else None,
        )
        result.build_s = time.perf_counter() - start
        result.size_mb = os.path.getsize(package) / 2**20
        result.max_error, result.detail = _check_package(package, model, workdir)
        artefact = torch._inductor.aoti_load_package(package)  # in-process, for timing only
    else:
        try:
            import torch_tensorrt
        except ImportError as error:
            return Result(experiment, f"skipped: torch_tensorrt not importable ({error})")
        spec = torch_tensorrt.Input(min_shape=(1, 2), opt_shape=(1, 4096), max_shape=(1, MAX_LEN),
                                    dtype=torch.int64)
        artefact = dilated_compile.tensorrt.compile(
            model, example, dynamic_shapes=_dynamic_shapes(), arg_inputs=[spec], min_block_size=1,
        )
        result.build_s = time.perf_counter() - start
        with torch.no_grad():
            errors = [
                (artefact(x).float() - model(x).float()).abs().max().item()
                for x in (_tokens(n, seed=n) for n in LENGTHS)
            ]
        result.max_error, result.detail = max(errors), f"errors by length {dict(zip(LENGTHS, errors))}"
    longest = _tokens(LENGTHS[-1], seed=1)
    with torch.no_grad():
        result.eager_ms = _median_ms(model, longest)
        result.artefact_ms = _median_ms(artefact, longest)
    if not result.max_error <= TOLERANCES[experiment.dtype]:
        result.status = "FAIL"
    return result


def _print_table(results: list[Result]) -> None:
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    cxx = CXX or torch._inductor.config.cpp.cxx[-1]
    print(f"\ntorch {torch.__version__}, {device}, C++ compiler {cxx}, "
          f"lengths {LENGTHS} (timed at {LENGTHS[-1]})")
    header = f"{'target':14} {'dtype':9} {'example':>7} {'status':10} {'build s':>8} {'max err':>10} " \
             f"{'eager ms':>9} {'artefact ms':>12} {'MB':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        e = r.experiment
        print(f"{e.target:14} {str(e.dtype)[6:]:9} {e.example:7} {r.status[:10]:10} {r.build_s:8.1f} "
              f"{r.max_error:10.2e} {r.eager_ms:9.2f} {r.artefact_ms:12.2f} {r.size_mb:6.1f}")
    for r in results:
        if r.status != "ok":
            print(f"{r.experiment.target} {r.experiment.dtype} {r.experiment.example}: {r.status} {r.detail}")


def main() -> int:
    global DEVICE, LENGTHS, CXX
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--targets", nargs="+", default=["aoti-kernels", "aoti-decomp", "tensorrt"])
    parser.add_argument("--out", help="directory for report.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument("--cxx", help="C++ compiler for AOTInductor packages, e.g. g++-12")
    parser.add_argument("--examples", nargs="+", type=int, default=[1000],
                        help="lengths of the example inputs to export from (one build each)")
    options = parser.parse_args()
    DEVICE, LENGTHS, CXX = options.device, tuple(options.lengths), options.cxx
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (or --device cpu for a smoke run)")
        return 2
    experiments = [
        Experiment(target, getattr(torch, dtype), example)
        for dtype in options.dtypes for target in options.targets for example in options.examples
        if not (target == "aoti-decomp" and dtype != "float32")  # one decomposed build suffices
    ]
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for experiment in experiments:
            print(f"running {experiment.target} {experiment.dtype} from {experiment.example} tokens ...",
                  flush=True)
            try:
                results.append(run_experiment(experiment, workdir))
            except Exception as error:  # report every experiment, then fail
                results.append(Result(experiment, "FAIL", detail=f"{type(error).__name__}: {error}"[:3000]))
            print(f"  {results[-1].status} {results[-1].detail[:300]}", flush=True)
    _print_table(results)
    if options.out:
        os.makedirs(options.out, exist_ok=True)
        with open(os.path.join(options.out, "report.json"), "w") as f:
            report = [{**dataclasses.asdict(r), "experiment": {
                "target": r.experiment.target, "dtype": str(r.experiment.dtype),
                "example": r.experiment.example}} for r in results]
            json.dump(report, f, indent=1)
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
