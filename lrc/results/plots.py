"""Figures of a comparison: metric vs ratio per method, and one run's ranks per layer.

Object-oriented matplotlib (``Figure`` without pyplot: no global state, no display needed);
every function returns the Figure so a notebook can show it and the report can save it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

BLOCK = re.compile(r"\.(\d+)\.")


def metric_vs_ratio(points: Sequence[Mapping[str, Any]], metric: str, dense: float | None = None,
                    log_scale: bool = False, title: str | None = None, stderr: str | None = None) -> Figure:
    """One line per method: ``points`` are ``{"method", "ratio", metric}`` rows; where a point
    has ``stderr`` (a key), its error bar spans ± 1 standard error."""
    lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for p in points:
        if p.get(metric) is not None:
            se = p.get(stderr) if stderr else None
            lines[p["method"]].append((float(p["ratio"]), float(p[metric]), float(se) if se is not None else 0.0))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for method, xy in sorted(lines.items()):
        xy.sort()
        errors = [e for _, _, e in xy]
        ax.errorbar([x for x, _, _ in xy], [y for _, y, _ in xy], yerr=errors if any(errors) else None,
                    marker="o", capsize=3, label=method)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("ratio (fraction of target parameters removed)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs ratio")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def ranks_per_layer(ranks: Mapping[str, int], title: str = "ranks per layer") -> Figure:
    """Rank of every projection type against its decoder block index."""
    lines: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for name, rank in ranks.items():
        match = BLOCK.search(name)
        if match:
            lines[name.rsplit(".", 1)[-1]].append((int(match.group(1)), int(rank)))
    fig = Figure(figsize=(7.2, 4.2))
    ax = fig.add_subplot()
    for kind, xy in sorted(lines.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker=".", label=kind)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("rank (dense matrices at their full rank)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig
