"""What an ``attn_mask`` costs the Triton kernels of dilated attention, on one CUDA GPU.

Workload: bf16, B=1, H=16, D=64, segment_lengths=(2048, 4096, 8192, 16384),
dilation_rates=(1, 2, 4, 8), mixture, non-causal, N = 16K and 64K. Each N is timed without a mask,
with a bool key-padding mask [B, 1, 1, N] (True = keep; the last 10% of the keys padded), with
the same mask as a float one (0 / -inf), with a bool key mask that removes a random 10% of the
keys ("scattered": no segment is all kept, so every program reads the mask: the masked loop's
own cost), forward and forward+backward, then unmasked once more (the spread of the two unmasked
times is the noise). Target: the key-padding mask costs at most 15% over unmasked at 64K.

Before timing, each N is checked: on the queries before the padding, the masked op must give
what the op gives on the sequence cut at the padding (their segments are the same), and the
float mask what the bool mask gives; at 16K the gradients too (with no gradient from the padded
queries, dk/dv of the kept keys equal the cut sequence's and those of the padded keys are 0).
Times are medians of ``triton.testing.do_bench``. Usage::

    DILATED_COMPILE_AUTOTUNE=0 PYTHONPATH=. python benchmarks/bench_masked.py
    PYTHONPATH=. python benchmarks/bench_masked.py --n 65536
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import time

import torch
from timing import median_ms

from dilated_compile.ops import dilated_attention_op
from dilated_compile.ops.dilated_attention import uses_triton_kernels
from dilated_compile.ops.dilated_attention_pytorch import dilated_attention_pytorch_op

SEGMENTS = [2048, 4096, 8192, 16384]
RATES = [1, 2, 4, 8]
B, H, D = 1, 16, 64
DTYPE = torch.bfloat16
PAD_FRACTION = 0.1
MASKS = ("none", "bool", "float", "bool scattered", "none (again)")


@dataclasses.dataclass(frozen=True)
class Experiment:
    n: int
    mask: str  # one of MASKS
    backward: bool

    @property
    def kept(self) -> int:
        return self.n - int(self.n * PAD_FRACTION)


def key_padding_mask(n: int, kind: str):
    """[B, 1, 1, N]: keep the first ``n - 10%`` keys; None, bool (True = keep) or float."""
    if kind.startswith("none"):
        return None
    if kind == "bool scattered":
        g = torch.Generator(device="cuda").manual_seed(n)
        return (torch.rand(n, device="cuda", generator=g) >= PAD_FRACTION).view(1, 1, 1, n)
    keep = (torch.arange(n, device="cuda") < n - int(n * PAD_FRACTION)).view(1, 1, 1, n)
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, device="cuda", dtype=DTYPE).masked_fill(~keep, float("-inf"))


def attend(q, k, v, mask):
    return dilated_attention_op(q, k, v, SEGMENTS, RATES, "mixture", False, None, mask)[0]


def inputs(n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_()
            for _ in range(3)]


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def check(n: int, with_grads: bool) -> dict:
    """Relative L2 errors of the masked op against the cut sequence (and bool vs float)."""
    q, k, v = inputs(n, seed=1)
    kept = n - int(n * PAD_FRACTION)
    grad = torch.randn(B, H, n, D, device="cuda", dtype=DTYPE)
    grad[:, :, kept:] = 0  # the padded queries have no counterpart on the cut sequence
    short = [t.detach()[:, :, :kept].clone().requires_grad_() for t in (q, k, v)]
    want = attend(*short, None)
    masked = attend(q, k, v, key_padding_mask(n, "bool"))
    with torch.no_grad():
        as_float = attend(q, k, v, key_padding_mask(n, "float"))
    errors = {"out": rel_err(masked[:, :, :kept], want), "float_vs_bool": rel_err(as_float, masked)}
    if with_grads:  # the scattered mask against the PyTorch implementation (fp32 inside)
        scattered = key_padding_mask(n, "bool scattered")
        with torch.no_grad():
            got = attend(q, k, v, scattered)
            ref = dilated_attention_pytorch_op(q, k, v, SEGMENTS, RATES, "mixture", False, None,
                                               scattered.expand(B, H, n, n))[0]
        errors["scattered_vs_pytorch"] = rel_err(got, ref)
    if with_grads:
        got = torch.autograd.grad(masked, (q, k, v), grad)
        expected = torch.autograd.grad(want, short, grad[:, :, :kept])
        for name, a, b in zip(("dq", "dk", "dv"), got, expected):
            errors[name] = rel_err(a[:, :, :kept], b)
        padded = (got[1][:, :, kept:] == 0).all() and (got[2][:, :, kept:] == 0).all()
        errors["padded_dkdv_zero"] = bool(padded)
    return errors


def bench(e: Experiment, q, k, v) -> float:
    mask = key_padding_mask(e.n, e.mask)
    return median_ms(lambda: attend(q, k, v, mask), [q, k, v], e.backward)


def table(rows: list[dict]) -> str:
    lines = ["| N | pass | mask | ms | × unmasked |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n'] // 1024}K | {r['pass']} | {r['mask']} | {r['ms']:.3f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def main():
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
    args = parser.parse_args()

    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    meta = (f"device={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
            f"date={time.strftime('%Y-%m-%d')} commit={commit or 'n/a'}{'+changes' if dirty else ''} "
            f"DILATED_COMPILE_AUTOTUNE={os.environ.get('DILATED_COMPILE_AUTOTUNE', '1')}")
    print("#", meta, flush=True)

    rows = []
    for n in args.n:
        errors = check(n, with_grads=n <= 16384)
        print(f"# check N={n}: {errors}", flush=True)
        bad = [k for k, e in errors.items() if (e is False) or (not isinstance(e, bool) and not e < 1e-2)]
        if bad:
            raise SystemExit(f"N={n}: masked results off ({bad}); not timing")
        q, k, v = inputs(n)
        assert uses_triton_kernels(q, k, v)
        for backward in (False, True):
            base = None
            for mask in MASKS:
                ms = bench(Experiment(n, mask, backward), q, k, v)
                base = ms if base is None else base
                rows.append(dict(n=n, mask=mask, ms=ms, ratio=ms / base,
                                 **{"pass": "fwd+bwd" if backward else "fwd"}))
                print(f"# {rows[-1]}", flush=True)
    print()
    print(meta)
    print(table(rows))


if __name__ == "__main__":
    main()
