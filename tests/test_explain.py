"""``explain`` and ``python -m dilated_compile explain FILE:FUNCTION``."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from dilated_compile import DilatedSpec, GraphBreakInDilatedRegionWarning, dilated, dilated_attention, explain
from dilated_compile.ops import annotation_op, dilated_attention_op

SPEC = DilatedSpec((8, 16), (1, 2))


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):  # x: [B, H, N, D]
        with dilated(SPEC):
            y = F.scaled_dot_product_attention(x, x, x, is_causal=True)
        return self.proj(y) + F.scaled_dot_product_attention(x, x, x)


def test_report_before_after_rewrites_and_text():
    x = torch.randn(1, 2, 30, 8)
    report = explain(Block(), x)

    assert annotation_op in _targets(report.before)
    assert dilated_attention_op not in _targets(report.before)
    assert dilated_attention_op in _targets(report.after)
    assert annotation_op not in _targets(report.after)
    (rewrite,) = report.rewrites
    assert rewrite.spec == SPEC and rewrite.op == "dilated_compile.dilated_attention"
    assert rewrite.node in {n.name for n in report.before.graph.nodes}
    assert report.graph_breaks == []
    text = str(report)
    assert "1 rewrite(s)" in text and "Graph 0 before:" in text and "Graph 0 after:" in text
    assert "segment_lengths=(8, 16)" in text


def test_rewritten_graph_runs_and_computes_dilated_attention():
    def attend(x):
        with dilated(SPEC):
            return F.scaled_dot_product_attention(x, x, x, is_causal=True).relu()

    x = torch.randn(1, 2, 30, 8)
    report = explain(attend, x)
    expected = dilated_attention(x, x, x, SPEC, is_causal=True).relu()
    torch.testing.assert_close(report.after(x)[0], expected)


def test_report_with_graph_breaks():
    def split(x):
        with dilated(SPEC):
            y = F.scaled_dot_product_attention(x, x, x)
            torch._dynamo.graph_break()
            return F.scaled_dot_product_attention(y, y, y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphBreakInDilatedRegionWarning)
        report = explain(split, torch.randn(1, 2, 20, 8))
    assert len(report.graphs) == 2 and len(report.rewrites) == 2
    assert len(report.graph_breaks) == 1 and "in split" in report.graph_breaks[0]
    with pytest.raises(ValueError, match="captured as 2 graphs"):
        report.before
    assert "Graph break: graph break inside dilated(" in str(report)


def _run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "dilated_compile", *args], cwd=cwd, capture_output=True,
        text=True, timeout=300,
    )


def test_command_line(tmp_path):
    (tmp_path / "user_model.py").write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from dilated_compile import dilated

        def example():
            q = k = v = torch.randn(1, 4, 64, 16)
            with dilated(segment_lengths=(16, 32), dilation_rates=(1, 2)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    """))
    done = _run_cli("explain", "user_model.py:example", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 rewrite(s)" in done.stdout
    assert "-> dilated_compile.dilated_attention DilatedSpec(segment_lengths=(16, 32)" in done.stdout
    assert "torch.ops.dilated_compile.dilated_attention.default" in done.stdout

    missing = _run_cli("explain", "user_model.py:nope", cwd=tmp_path)
    assert missing.returncode != 0 and "has no function 'nope'" in missing.stderr
    malformed = _run_cli("explain", "user_model.py", cwd=tmp_path)
    assert malformed.returncode != 0 and "FILE:FUNCTION" in malformed.stderr
