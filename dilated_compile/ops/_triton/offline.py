"""Build the Triton kernels for a CUDA target on a machine without a GPU.

Triton's front end (Python to Triton IR) and its compiler down to SASS need no GPU: the NVIDIA
backend ships ``ptxas`` and ``nvdisasm``. This module builds a registered kernel for an explicit
target with an explicit specialisation, which serves two purposes:

- ``build_ir``: the front end alone (~0.05 s). ``tests/test_kernel_builds.py`` builds
  every kernel with each unspecialised scalar passed as the constexpr 1, the way torch.compile's
  launch path specialises it; a kernel that only builds in eager fails there on any machine.
- ``sass`` and ``loop_bodies``: the machine code of a config, and the instruction mix of each
  loop in it. ``benchmarks/kernel_sass.py`` prints it for the shipped configs: what a loop body
  costs per iteration (selects, spills to local memory, address arithmetic), read off without a
  GPU.

Arguments are typed from their names, the kernels' conventions: capitalised arguments are
tensors (``N`` and ``NQ`` aside, which are lengths), ``dOut`` too; ``scale_log2`` is a float;
every other argument is a 32-bit integer. Tensors are bf16 unless the kernels keep them in
float32 (lse, Delta, the running output and partial results) or int32 (indices, counts) or uint8
(the mask). As at a real launch, the strides named in ``UNIT_STRIDES`` are the constexpr 1 and
the other strides and every pointer carry the 16-divisibility hint.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable

import triton

_FLOAT32_TENSORS = {"Lse", "Delta", "Prev", "Part", "PartLse"}
_INT32_TENSORS = {"Counts", "KvIdx", "KvCnt", "Identity", "QPtr", "QIdx"}
_CAPITALISED_INTS = {"N", "NQ"}
#: Head-dim strides of contiguous tensors: 1 at every real launch, so Triton specialises them.
UNIT_STRIDES = ("sqd", "skd", "svd", "sgd", "sod")
#: Constexpr values for the arguments a caller leaves out.
DEFAULTS = dict(HEAD_DIM=64, HEAD_DIM_V=64, DOT_PRECISION="tf32", FUSED_SCALE=True, PARTS=1,
                IS_CAUSAL=False, QUERY_TAIL=False, HAS_MASK=False, MASK_BOOL=False,
                MASK_PER_QUERY=False, SPAN_FILTER=0, MERGE=False, ACCUMULATE=False,
                BY_QUERY=False, WHOLE_BLOCKS=False,
                QUERIES_WHOLE=False, SPLIT_DENSE=True, BLOCK_SIZE=128, BLOCK_M=64, BLOCK_N=64)


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)  # sm_90: the H100 and H200


def _is_tensor(name: str) -> bool:
    return (name[0].isupper() and name not in _CAPITALISED_INTS) or name == "dOut"


def signature(fn, constexprs: dict, ones: Iterable[str] = (), unit_strides: bool = False):
    """(signature, constants, attributes) of ``fn`` (a ``triton.jit`` function) for
    ``triton.compiler.ASTSource``: ``constexprs`` over ``DEFAULTS`` for its constexpr arguments,
    the arguments in ``ones`` passed as the constexpr 1, and with ``unit_strides`` the
    ``UNIT_STRIDES`` too plus the divisibility hints of a real launch."""
    ones = set(ones) | (set(UNIT_STRIDES) if unit_strides else set())
    types, constants, attributes = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
            constants[name] = constexprs.get(name, DEFAULTS.get(name))
        elif name in ones:
            types[name] = "constexpr"
            constants[name] = 1
        elif name == "scale_log2":
            types[name] = "fp32"
        elif _is_tensor(name):
            types[name] = ("*fp32" if name in _FLOAT32_TENSORS else "*i32" if name in _INT32_TENSORS
                           else "*u8" if name == "Mask" else "*bf16")
        else:
            types[name] = "i32"
        aligned = types[name].startswith("*") or (types[name] == "i32" and name.startswith("s"))
        if unit_strides and aligned and not param.do_not_specialize:
            attributes[(index,)] = [["tt.divisibility", 16]]
    return types, constants, attributes


def build_ir(fn, constexprs: dict, ones: Iterable[str] = ()) -> None:
    """Run Triton's front end on ``fn`` for sm_90 (no GPU needed); raises
    ``triton.compiler.errors.CompilationError`` where a launch would."""
    from triton._C.libtriton import ir
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = _target()
    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    types, constants, _ = signature(fn, constexprs, ones)
    source = ASTSource(fn, types, constants)
    args = (options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    if "target" in inspect.signature(source.make_ir).parameters:  # Triton >= 3.3
        args = (target, *args)
    source.make_ir(*args)


def sass(fn, constexprs: dict, num_warps: int, num_stages: int) -> str:
    """The SASS of ``fn`` compiled for sm_90 with ``constexprs`` (over ``DEFAULTS``) and the
    given warps and stages, as ``nvdisasm`` prints it."""
    from triton.compiler import ASTSource

    source = ASTSource(fn, *signature(fn, constexprs, unit_strides=True))
    kernel = triton.compile(source, target=_target(),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    disassembler = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                "nvdisasm")
    if not os.path.isfile(disassembler):
        raise FileNotFoundError(f"{disassembler}: this Triton install has no nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([disassembler, "-c", cubin.name], capture_output=True, text=True,
                              check=True).stdout


_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?);")
_OPCODE = re.compile(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_BACK_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def loop_bodies(text: str) -> list[collections.Counter]:
    """The opcodes of each loop in ``sass``'s output (the instructions from a label to a branch
    back to it), in program order: one ``Counter`` of opcode -> count per loop."""
    instructions, labels = [], {}
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
        elif match := _INSTRUCTION.search(line):
            instructions.append(match.group(1))
    loops = []
    for index, instruction in enumerate(instructions):
        branch = _BACK_BRANCH.search(instruction)
        if branch and labels.get(branch.group(1), index + 1) <= index:
            body = instructions[labels[branch.group(1)]: index + 1]
            loops.append(collections.Counter(_OPCODE.match(i).group(1) for i in body))
    return loops
