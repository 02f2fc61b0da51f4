"""Command line: ``python -m dilated_compile explain FILE:FUNCTION``.

Prints the graphs of ``FUNCTION`` (defined in ``FILE``) before and after the rewrite, and the
list of rewrites. ``FUNCTION`` takes no arguments: it builds its own example inputs and calls the
code to explain.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def _load_function(target: str):
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        raise SystemExit(f"error: expected FILE:FUNCTION, got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise SystemExit(f"error: no such file: {path}")
    module_name = f"_dilated_compile_explain_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
    spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SystemExit(f"error: {path} has no function {name!r}")
    return fn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dilated_compile")
    commands = parser.add_subparsers(dest="command", required=True)
    explain_parser = commands.add_parser(
        "explain", help="print a function's graphs before/after the rewrite and the rewrites"
    )
    explain_parser.add_argument(
        "target", metavar="FILE:FUNCTION",
        help="a function of no arguments that builds its inputs and runs the code to explain",
    )
    args = parser.parse_args(argv)

    from . import explain

    print(explain(_load_function(args.target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
