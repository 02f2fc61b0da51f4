"""Smoke test of examples/train_longnet.py with tiny settings."""

import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_longnet.py"


def test_train_longnet_runs_and_saves_the_plot(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_longnet", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_longnet", example)  # dataclasses look their module up
    spec.loader.exec_module(example)
    png = tmp_path / "curves.png"
    results = example.main([
        "--tiny", "--steps", "3", "--device", "cpu", "--timing-steps", "1", "--out", str(png),
        "--compile-backend", "dilated_compile_aot_eager",
    ])
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results) == {"histories", "eager_tokens_per_s", "compiled_tokens_per_s"}
    assert all(len(h["loss"]) == 3 for h in results["histories"].values())
    for line in ("LongNet w=(4, 16, 64) r=(1, 2, 4)", "shortest segment only w=(4,)", "chance", "tokens/s"):
        assert line in out
