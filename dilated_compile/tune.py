"""Tune the Triton kernels on this GPU and write the table of tuned configs.

``python -m dilated_compile.tune`` runs the forward and backward of every kernel over a set of
workloads with autotuning forced on, and writes what the autotuner chose, per kernel and tuning
key, for this GPU model. The package ships such a table for the GPUs it was tuned on
(``dilated_compile/ops/_triton/tuned_configs.json``): on them a first call compiles one config
and benchmarks none. To tune for your GPU or your own shapes::

    python -m dilated_compile.tune --out my_configs.json                      # the standard set
    python -m dilated_compile.tune --out my_configs.json --n 32768 \\
        --segment-lengths 1024 2048 4096 --dilation-rates 1 2 4 --head-dim 128
    python -m dilated_compile.tune --out my_configs.json --kernels dilated_bwd_dkdv  # one kernel
    export DILATED_COMPILE_TUNED_CONFIGS=my_configs.json                     # use it

An existing ``--out`` file is updated: this GPU's entries are merged in, other GPUs' kept. With
``--kernels`` only the kernels named by those prefixes autotune and are written (the others run
with the table's configs): after changing one kernel, ``--out`` the package's table and
``--kernels`` that kernel re-tune its entries alone.
Tuning takes about a minute per shape class at 64K tokens. The configs never change results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dilated_compile.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the table to write or update")
    parser.add_argument("--n", type=int, default=65536, help="sequence length of the runs")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--segment-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--kernels", nargs="+", default=None, metavar="PREFIX",
                        help="tune only the kernels whose names start with these (for example "
                             "dilated_bwd_dkdv); the others run with the table's configs")
    parser.add_argument("--skip-block-sparse", action="store_true")
    parser.add_argument("--skip-dilated", action="store_true")
    return parser


def _workloads(args):
    """(label, op call) pairs: each runs one forward and backward."""
    import torch

    from dilated_compile import BlockSparseSpec, DilatedSpec, dilated_attention

    dtype = getattr(torch, args.dtype)

    def inputs(d):
        return [torch.randn(1, args.heads, args.n, d, device="cuda", dtype=dtype, requires_grad=True)
                for _ in range(3)]

    for d in args.head_dim:
        for causal in (False, True):
            if not args.skip_dilated:
                for mode in ("mixture", "head_groups"):
                    spec = DilatedSpec(args.segment_lengths, args.dilation_rates, mode)
                    yield (f"dilated {mode} D={d} causal={causal}",
                           lambda spec=spec, d=d, causal=causal: dilated_attention(
                               *inputs(d), spec, is_causal=causal))
            if not args.skip_block_sparse:
                for name, fields in (("local", dict(local_blocks=4)),
                                     ("bigbird", dict(local_blocks=1, global_blocks=2, random_blocks=3))):
                    spec = BlockSparseSpec(args.block_size, **fields)
                    yield (f"block_sparse {name} D={d} causal={causal}",
                           lambda spec=spec, d=d, causal=causal: _block_sparse(spec, inputs(d), causal))


def _block_sparse(spec, qkv, causal):
    import torch.nn.functional as F

    from dilated_compile import block_sparse

    with block_sparse(spec):
        return F.scaled_dot_product_attention(*qkv, is_causal=causal)


def _write(path: Path, entries: dict) -> int:
    """Merge ``entries`` (kernel -> key -> config) into ``path`` for this GPU; the count."""
    import torch
    import triton

    name = torch.cuda.get_device_name()
    table = json.loads(path.read_text()) if path.is_file() else {"devices": {}}
    entry = table["devices"].setdefault(name, {"kernels": {}})
    entry.update(
        capability=list(torch.cuda.get_device_capability()), triton=triton.__version__,
        torch=torch.__version__, date=datetime.date.today().isoformat(),
    )
    for kernel, keys in entries.items():
        entry["kernels"].setdefault(kernel, {}).update(keys)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return sum(len(k) for k in entry["kernels"].values())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.environ.get("DILATED_COMPILE_AUTOTUNE", "auto") == "0":
        print("DILATED_COMPILE_AUTOTUNE=0 keeps one config per kernel: unset it to tune", file=sys.stderr)
        return 2
    import torch

    from dilated_compile.ops._triton import tuning

    if args.kernels:
        # Only the named kernels autotune (and are written); the others take the table's configs.
        try:
            tuning.retune(tuple(args.kernels))
        except ValueError as error:
            print(f"--kernels: {error}", file=sys.stderr)
            return 2
    else:
        os.environ["DILATED_COMPILE_AUTOTUNE"] = "1"  # every launch autotunes (the table is not read)
    if not torch.cuda.is_available():
        print("tuning needs a CUDA GPU", file=sys.stderr)
        return 2

    for label, run in _workloads(args):
        start = time.perf_counter()
        out = run()
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        # After each workload: an interrupted run keeps its work.
        count = _write(args.out, tuning.tuned_entries())
        print(f"{label}: tuned in {time.perf_counter() - start:.1f} s ({count} configs)", flush=True)
    print(f"wrote the tuned configs for {torch.cuda.get_device_name()} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
