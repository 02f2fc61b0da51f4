"""Every Triton kernel builds however its integer arguments are specialised.

Triton's launcher passes an integer argument equal to 1 as a constexpr unless the kernel says
``do_not_specialize``, and the kernels say so for the scalars that vary with the pattern, the
heads and N. torch.compile's launch path (Inductor, ``wrap_triton``) specialises them anyway,
so a kernel whose code rebinds such a scalar inside a runtime branch builds in eager and fails
only under torch.compile, and only on the calls where that scalar is 1 (a head group of rate 1,
say). This builds each kernel's Triton IR (the front end only: no GPU, no ptxas, ~0.05 s a
build) for an sm_90 target with each of those scalars in turn a constexpr 1, over constexpr
settings that switch on every optional path.
"""

from __future__ import annotations

import inspect
import os

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="builds compiled kernels: not under the interpreter"
)

# Pointer arguments by their names (the integer N and NQ aside, every capitalised argument is
# a tensor); float32 tensors among them.
_FLOAT32_POINTERS = {"Lse", "Delta", "Prev", "Part", "PartLse"}
_INT_POINTERS = {"Counts", "KvIdx", "KvCnt", "Identity", "QPtr", "QIdx"}
_CAPITALISED_INTS = {"N", "NQ"}

# Constexpr settings: every optional path off, then on (masks of both kinds, key-padding
# launches, fewer queries than keys, grouped parts, merging and accumulating launches).
_SETTINGS = [
    dict(IS_CAUSAL=False, PARTS=1, QUERY_TAIL=False, HAS_MASK=False, MASK_BOOL=False,
         MASK_PER_QUERY=False, SPAN_FILTER=0, MERGE=False, ACCUMULATE=False, SPLIT_DENSE=False),
    dict(IS_CAUSAL=True, PARTS=4, QUERY_TAIL=True, HAS_MASK=True, MASK_BOOL=True,
         MASK_PER_QUERY=False, SPAN_FILTER=2, MERGE=True, ACCUMULATE=True, SPLIT_DENSE=True),
    dict(IS_CAUSAL=False, PARTS=3, QUERY_TAIL=True, HAS_MASK=True, MASK_BOOL=False,
         MASK_PER_QUERY=True, SPAN_FILTER=1, MERGE=True, ACCUMULATE=True, SPLIT_DENSE=False),
]
_COMMON = dict(HEAD_DIM=64, HEAD_DIM_V=64, DOT_PRECISION="tf32", FUSED_SCALE=True, BLOCK_M=64,
               BLOCK_N=64)


def _kernels():
    from dilated_compile.ops._triton import block_sparse_attention, dilated_attention  # noqa: F401
    from dilated_compile.ops._triton.tuning import REGISTRY

    # One kernel of each function (the registry holds dtype and block-size variants of each).
    kernels = {}
    for name, autotuner in REGISTRY.items():
        kernels.setdefault(autotuner.fn.fn.__name__, (name, autotuner.fn))
    return sorted(kernels.values())


def _signature(fn, ones: set[str], constexprs: dict):
    signature, constants = {}, {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[name] = constexprs.get(name, _COMMON.get(name, 128))
        elif name in ones:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name.startswith("scale"):
            signature[name] = "fp32"
        elif (name[0].isupper() and name not in _CAPITALISED_INTS) or name == "dOut":
            if name in _FLOAT32_POINTERS:
                signature[name] = "*fp32"
            elif name in _INT_POINTERS:
                signature[name] = "*i32"
            else:
                signature[name] = "*u8" if name == "Mask" else "*bf16"
        else:
            signature[name] = "i32"
    return signature, constants


def _build(fn, ones: set[str], constexprs: dict) -> None:
    """Triton IR of ``fn`` for sm_90: raises ``CompilationError`` where the front end does."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(fn, *_signature(fn, ones, constexprs))
    args = (options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    if "target" in inspect.signature(source.make_ir).parameters:
        args = (target, *args)
    source.make_ir(*args)


@pytest.mark.parametrize("name, fn", _kernels(), ids=lambda x: x if isinstance(x, str) else "")
def test_kernels_build_with_any_scalar_specialised(name, fn):
    scalars = [p.name for p in fn.params if p.do_not_specialize and not p.is_constexpr]
    assert scalars, f"{name}: no unspecialised scalars: the test would check nothing"
    failures = []
    for settings in _SETTINGS:
        for one in [None, *scalars]:
            try:
                _build(fn, {one} - {None}, settings)
            except triton.compiler.errors.CompilationError as error:
                failures.append((f"{one}=1 with {settings}", error))
    assert not failures, (f"{name} fails to build with " + "; ".join(f for f, _ in failures[:5])
                          + f"\nthe first error:\n{failures[0][1]}")
