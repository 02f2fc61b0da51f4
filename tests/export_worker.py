"""Runs exported artefacts in a fresh process in which dilated_compile cannot be imported, and
prints, as JSON, each artefact's largest error against the expected outputs.

    python export_worker.py CASES.pt [--aoti PACKAGE.pt2] [--onnx MODEL.onnx]

CASES.pt (``torch.save``) holds ``{"inputs": [tensor, ...], "expected": [tensor, ...],
"device": "cpu" | "cuda"}``: one single-input call per entry, of any sequence length. Run by
test_export_targets.py and benchmarks/gpu_export_check.py.
"""

import argparse
import importlib.abc
import json
import sys


class _NoDilatedCompile(importlib.abc.MetaPathFinder):
    """Makes any import of the library fail: the artefacts must not need it."""

    def find_spec(self, name, path=None, target=None):
        if name == "dilated_compile" or name.startswith("dilated_compile."):
            raise ImportError(f"{name} was imported while running an exported artefact")
        return None


sys.meta_path.insert(0, _NoDilatedCompile())

import torch  # noqa: E402


def _error(got, want) -> float:
    return (torch.as_tensor(got).to(want.device).double() - want.double()).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases")
    parser.add_argument("--aoti")
    parser.add_argument("--onnx")
    options = parser.parse_args()
    cases = torch.load(options.cases, weights_only=True)
    inputs, expected, device = cases["inputs"], cases["expected"], cases["device"]
    report = {"lengths": [x.shape[-1] for x in inputs]}
    if options.aoti:
        runner = torch._inductor.aoti_load_package(options.aoti)
        report["aoti"] = [
            _error(runner(x.to(device)), want) for x, want in zip(inputs, expected)
        ]
    if options.onnx:
        import onnxruntime

        session = onnxruntime.InferenceSession(options.onnx, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        report["onnx"] = [
            _error(session.run(None, {name: x.cpu().numpy()})[0], want.cpu())
            for x, want in zip(inputs, expected)
        ]
        report["onnx_nodes"] = len(__import__("onnx").load(options.onnx).graph.node)
    report["dilated_compile_imported"] = any(m.startswith("dilated_compile") for m in sys.modules)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
