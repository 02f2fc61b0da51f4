"""``explain``: what the rewrite does to a function's graphs, before and after."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .graph_breaks import graph_break_in_region
from .passes import Rewrite, rewrite_annotated_sdpa
from .passes.rewrite_annotated_sdpa import REWRITES_META_KEY


@dataclasses.dataclass
class GraphRewrite:
    """One graph Dynamo captured: as captured (``before``) and as rewritten (``after``)."""

    before: torch.fx.GraphModule
    after: torch.fx.GraphModule
    rewrites: list[Rewrite]
    graph_break: str | None  # the break that ends this graph inside a dilated(...) region


@dataclasses.dataclass
class ExplainReport:
    """What ``explain`` found.

    Attributes:
        graphs: every captured graph (more than one when the function has graph breaks).
        rewrites: every rewritten call, over all graphs.
        graph_breaks: the graph breaks found inside ``dilated(...)`` regions.
        before, after: the single graph as captured and as rewritten (with several graphs,
            use ``graphs``).
    """

    graphs: list[GraphRewrite]

    @property
    def rewrites(self) -> list[Rewrite]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def graph_breaks(self) -> list[str]:
        return [g.graph_break for g in self.graphs if g.graph_break is not None]

    def _single(self) -> GraphRewrite:
        if len(self.graphs) != 1:
            raise ValueError(
                f"the function was captured as {len(self.graphs)} graphs (graph breaks split "
                "it); use report.graphs[i].before / .after"
            )
        return self.graphs[0]

    @property
    def before(self) -> torch.fx.GraphModule:
        return self._single().before

    @property
    def after(self) -> torch.fx.GraphModule:
        return self._single().after

    def __str__(self) -> str:
        lines = [
            f"dilated_compile.explain: {len(self.graphs)} graph(s), "
            f"{len(self.rewrites)} rewrite(s), {len(self.graph_breaks)} graph break(s) inside "
            "dilated regions",
            "",
            "Rewrites:",
        ]
        lines += [f"  {r}" for r in self.rewrites] or ["  (none)"]
        for description in self.graph_breaks:
            lines.append(f"Graph break: {description}")
        for i, g in enumerate(self.graphs):
            for label, gm in (("before", g.before), ("after", g.after)):
                lines += ["", f"Graph {i} {label}:", gm.print_readable(print_output=False).rstrip()]
        return "\n".join(lines)


def explain(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ExplainReport:
    """Capture ``fn(*args, **kwargs)`` with Dynamo and show what the rewrite pass does.

    ``fn`` (a function or module) runs once, its graphs executed eagerly after the rewrite, so
    its annotated SDPA calls compute dilated attention. Nothing is compiled with Inductor.

    Example::

        >>> report = dilated_compile.explain(model, x)
        >>> print(report)          # rewrites, then each graph before and after
        >>> report.rewrites[0].spec
        DilatedSpec(segment_lengths=(2048, 4096), dilation_rates=(1, 2), mode='mixture')
    """
    graphs: list[GraphRewrite] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]):
        graph_break = graph_break_in_region(gm)
        before = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        after = rewrite_annotated_sdpa(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)))
        graphs.append(GraphRewrite(before, after, list(after.meta[REWRITES_META_KEY]), graph_break))
        return after.forward

    torch.compile(fn, backend=capture)(*args, **kwargs)
    return ExplainReport(graphs)
