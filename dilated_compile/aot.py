"""``aot_compile``: an AOTInductor package (``.pt2``) that runs without Python's dilated_compile.

The package is a shared library plus weights; ``torch._inductor.aoti_load_package(path)`` loads
it in any process with a matching PyTorch, with no ``import dilated_compile``. For that, nothing
in it may call an op defined in Python:

- on CPU the dilated op runs its PyTorch implementation, a Python custom op, so the op is
  replaced by its decomposition into aten ops first (``decompose=True``, the default on CPU);
- on CUDA the op's Triton kernels are compiled into the package (``decompose=False``, the
  default on CUDA; ``decompose=True`` gives Inductor-generated kernels instead).

The finished package is checked twice, and deleted with an error if either check fails:

- it must not call a ``dilated_compile::`` op at run time (a case the kernels do not cover, e.g.
  float64 or an unsupported head dim on CUDA): pass ``decompose=True``;
- it must be valid for the whole exported range. A package checks only that range at run time,
  not the guards Inductor adds from the example input's sizes; the graph is lowered
  size-obliviously, and a package whose range Inductor narrowed anyway is refused.

AOTInductor compiles C++ with ``$CXX`` (default ``g++``); see docs/export.md, "Troubleshooting",
for packages that crash when loaded.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any

import torch
from torch.export import ExportedProgram

from .export import as_program, dilated_op_nodes, program_device_types
from .ops.decompositions import dilated_attention_decompositions, size_oblivious

__all__ = ["aot_compile"]

# How AOTInductor records an op it calls through the dispatcher at run time (the proxy executor's
# node list, a JSON file in the package).
_RUNTIME_OP = re.compile(r'"target":\s*"(dilated_compile::\w+)"')


def _python_ops_in_package(path: str) -> list[str]:
    """``dilated_compile::`` ops the package would call through the dispatcher."""
    found = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(".json"):
                found.update(_RUNTIME_OP.findall(archive.read(name).decode("utf-8", "replace")))
    return sorted(found)


def _input_dims(program: ExportedProgram) -> tuple[Any, dict[Any, str]]:
    """The shape environment of the program's inputs, and a readable name of each dynamic
    dimension (``tokens.shape[1]``) by symbol."""
    env, names = None, {}
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(value, torch.Tensor):
            continue
        mode = getattr(value, "fake_mode", None)
        env = env or getattr(mode, "shape_env", None)
        for dim, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt) and size.node.expr in program.range_constraints:
                names.setdefault(size.node.expr, f"{node.name}.shape[{dim}]")
    return env, names


def _narrowed_ranges(names: dict[Any, str], before: dict[Any, Any], env: Any) -> list[str]:
    """Dynamic dimensions whose range AOTInductor narrowed while compiling (it adds guards from
    the example input's sizes; a package checks only the exported ranges at run time)."""
    narrowed = []
    for symbol, name in names.items():
        old, new = before.get(symbol), env.var_to_range.get(symbol)
        if old is not None and new is not None and (new.lower > old.lower or new.upper < old.upper):
            narrowed.append(f"{name} in [{new.lower}, {new.upper}] (exported as [{old.lower}, {old.upper}])")
    return narrowed


def aot_compile(
    module_or_program: torch.nn.Module | ExportedProgram,
    args: tuple[Any, ...],
    package_path: str | os.PathLike,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    strict: bool = True,
    decompose: bool | None = None,
    inductor_configs: dict[str, Any] | None = None,
) -> str:
    """Compile a model with AOTInductor into a ``.pt2`` package that loads without this library.

    Args:
        module_or_program: an ``nn.Module`` (exported with ``dilated_compile.export``) or an
            ``ExportedProgram`` from ``dilated_compile.export``.
        args: example positional inputs (a tuple), on the device the package is built for.
        package_path: where to write the package; must end in ``.pt2``.
        kwargs, dynamic_shapes, strict: passed to ``dilated_compile.export`` for a module.
        decompose: replace the dilated ops by their aten decomposition before compiling.
            None (default): True on CPU, False on CUDA (the op's Triton kernels are packaged).
        inductor_configs: passed to ``torch._inductor.aoti_compile_and_package``, e.g.
            ``{"cpp.cxx": "g++-12"}`` to choose the C++ compiler.

    Returns:
        The package path. Load it with ``torch._inductor.aoti_load_package(path)``; the loaded
        model takes the same inputs as ``module_or_program`` (any sequence length in the
        exported range) and returns the same outputs.

    Raises:
        RuntimeError: when the package would call a ``dilated_compile::`` op at run time (pass
            ``decompose=True``), or when Inductor specialised it to part of a dynamic
            dimension's range (export from another example, e.g. one longer than the largest
            segment); the package is deleted.

    Example::

        >>> seq = torch.export.Dim("seq", max=65536)
        >>> path = dilated_compile.aot_compile(
        ...     model, (tokens,), "model.pt2", dynamic_shapes={"tokens": {1: seq}})
        >>> # in another process, without dilated_compile:
        >>> runner = torch._inductor.aoti_load_package("model.pt2")
        >>> logits = runner(tokens)
    """
    package_path = os.fspath(package_path)
    if not package_path.endswith(".pt2"):
        raise ValueError(
            f"package_path must end in .pt2 (AOTInductor's package format), got {package_path!r}"
        )
    if decompose is not None and not isinstance(decompose, bool):
        raise TypeError(f"decompose must be True, False or None, got {decompose!r}")
    program = as_program(module_or_program, args, kwargs, dynamic_shapes, strict, "aot_compile")
    if decompose is None:
        decompose = "cuda" not in program_device_types(program)
    if decompose and dilated_op_nodes(program):
        program = program.run_decompositions(dilated_attention_decompositions())
    # Size-obliviously: Inductor takes sizes from the example input, and a package checks no
    # guard at run time, so a symbolic size that is 1 there must not be specialised on (the
    # decomposition avoids such sizes with a spare segment; other parts of a model may not).
    env, names = _input_dims(program)
    before = dict(env.var_to_range) if env is not None else {}
    with size_oblivious():
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=package_path, inductor_configs=inductor_configs
        )
    narrowed = _narrowed_ranges(names, before, env) if env is not None else []
    if narrowed:
        os.remove(path)
        raise RuntimeError(
            f"AOTInductor specialised the package to {'; '.join(narrowed)}: code valid only "
            "there, from guards on the example input's sizes, which a package does not check at "
            "run time; the package was not kept. Export with another example input (a longer "
            "one, say), or restrict the torch.export.Dim to that range."
        )
    python_ops = _python_ops_in_package(path)
    if python_ops:
        os.remove(path)
        raise RuntimeError(
            f"the AOTInductor package would call {python_ops} at run time, ops implemented in "
            "Python that only exist where dilated_compile is imported (the inputs take the "
            "PyTorch path of the dilated op, e.g. on CPU, in float64 or with a head dim the "
            "kernels do not cover); the package was not kept. Pass decompose=True to compile "
            "the op's aten decomposition into the package instead."
        )
    return path
