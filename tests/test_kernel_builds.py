"""The Triton kernels built for sm_90 on this machine (no GPU): every kernel builds however its
integer arguments are specialised, and the dilated backward's whole tiles carry no per-pair check.

Triton's launcher passes an integer argument equal to 1 as a constexpr unless the kernel says
``do_not_specialize``, and the kernels say so for the scalars that vary with the pattern, the
heads and N. torch.compile's launch path (Inductor, ``wrap_triton``) specialises them anyway,
so a kernel whose code rebinds such a scalar inside a runtime branch builds in eager and fails
only under torch.compile, and only on the calls where that scalar is 1 (a head group of rate 1,
say). This builds each kernel's Triton IR (``offline.build_ir``: the front end only, no GPU,
~0.05 s a build) for an sm_90 target with each of those scalars in turn a constexpr 1, over
constexpr settings that switch on every optional path.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from dilated_compile.ops._triton.offline import build_ir, loop_bodies, sass  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="builds compiled kernels: not under the interpreter"
)

# Constexpr settings: every optional path off, then on (masks of both kinds, key-padding
# launches, fewer queries than keys, grouped parts, merging and accumulating launches, dk/dv
# score tiles laid [queries, keys], keys and queries on block boundaries).
_SETTINGS = [
    dict(IS_CAUSAL=False, PARTS=1, QUERY_TAIL=False, HAS_MASK=False, MASK_BOOL=False,
         MASK_PER_QUERY=False, SPAN_FILTER=0, MERGE=False, ACCUMULATE=False, SPLIT_DENSE=False),
    dict(IS_CAUSAL=True, PARTS=4, QUERY_TAIL=True, HAS_MASK=True, MASK_BOOL=True,
         MASK_PER_QUERY=False, SPAN_FILTER=2, MERGE=True, ACCUMULATE=True, SPLIT_DENSE=True,
         BY_QUERY=True, WHOLE_BLOCKS=True, QUERIES_WHOLE=True),
    dict(IS_CAUSAL=False, PARTS=3, QUERY_TAIL=True, HAS_MASK=True, MASK_BOOL=False,
         MASK_PER_QUERY=True, SPAN_FILTER=1, MERGE=True, ACCUMULATE=True, SPLIT_DENSE=False,
         BY_QUERY=True),
]


def _kernels():
    from dilated_compile.ops._triton import block_sparse_attention, dilated_attention  # noqa: F401
    from dilated_compile.ops._triton.tuning import REGISTRY

    # One kernel of each function (the registry holds dtype and block-size variants of each).
    kernels = {}
    for name, autotuner in REGISTRY.items():
        kernels.setdefault(autotuner.fn.fn.__name__, (name, autotuner.fn))
    return sorted(kernels.values())


@pytest.mark.parametrize("name, fn", _kernels(), ids=lambda x: x if isinstance(x, str) else "")
def test_kernels_build_with_any_scalar_specialised(name, fn):
    scalars = [p.name for p in fn.params if p.do_not_specialize and not p.is_constexpr]
    assert scalars, f"{name}: no unspecialised scalars: the test would check nothing"
    failures = []
    for settings in _SETTINGS:
        for one in [None, *scalars]:
            try:
                build_ir(fn, settings, {one} - {None})
            except triton.compiler.errors.CompilationError as error:
                failures.append((f"{one}=1 with {settings}", error))
    assert not failures, (f"{name} fails to build with " + "; ".join(f for f, _ in failures[:5])
                          + f"\nthe first error:\n{failures[0][1]}")


# (kernel, causal, config, constexprs): a causal dq program's edge is one block (no loop at
# BLOCK_M == BLOCK_N).
@pytest.mark.parametrize("name, causal, config, constexprs", [
    ("dilated_bwd_dq", False, (64, 64, 4, 3), {}),
    ("dilated_bwd_dkdv", True, (64, 128, 8, 3), {}),
    ("dilated_bwd_dkdv", True, (64, 64, 4, 3), dict(BY_QUERY=True)),
])
def test_whole_tiles_have_no_per_pair_select(name, causal, config, constexprs):
    """The dq and dk/dv kernels walk their whole tiles in a loop of their own with no bounds or
    causal check: a select per score (FSEL) costs ~20% of an iteration at head dim 64. The edge
    loop after it keeps the checks. Compiled to SASS with ptxas and read back with nvdisasm,
    both shipped with Triton's NVIDIA backend."""
    from dilated_compile.ops._triton.tuning import REGISTRY

    block_m, block_n, warps, stages = config
    code = sass(REGISTRY[name].fn,
                dict(constexprs, IS_CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n), warps, stages)
    whole, edge = [body for body in loop_bodies(code) if body["HGMMA"]][:2]
    assert whole["MUFU"] > 0 and whole["FSEL"] == 0, whole
    assert edge["FSEL"] > 0, edge
