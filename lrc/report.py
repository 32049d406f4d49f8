"""Compare runs: one table (markdown and CSV) and PNG plots from ``result.json`` files or W&B.

    python -m lrc.report outputs/multirun/allocators            # a folder, searched recursively
    python -m lrc.report wandb:ENTITY/PROJECT --out report/      # runs of a W&B project

One row per run: method (allocator x factorizer), ratio, removed fraction, status, every
metric with the dense value and the ratio to it, and the seconds the run took. Plots:
every perplexity and mean zero-shot accuracy against the ratio (one line per method), and
the ranks per layer of one run (``--ranks-of``, default the run with the lowest perplexity).
Unreadable records are reported and skipped; failed runs are listed with their error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from lrc.files import atomic_write_bytes
from lrc.paths import RESULT_FILE

log = logging.getLogger(__name__)
WANDB_PREFIX = "wandb:"


def collect(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, problems) for every result.json below ``root``, sorted by path."""
    records, problems = [], []
    for path in sorted(Path(root).rglob(RESULT_FILE), key=_natural):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or "status" not in record:
                raise ValueError("not an lrc record")
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        record["_path"] = str(path.parent)
        records.append(record)
    return records, problems


def collect_wandb(project: str, api: Any = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Records rebuilt from the runs of a W&B project (``entity/project``): config, summary metrics."""
    if api is None:
        import wandb

        api = wandb.Api()
    records, problems = [], []
    for run in api.runs(project):
        summary = dict(run.summary)
        metrics = {k: v for k, v in summary.items() if _is_metric(k) and isinstance(v, (int, float))}
        dense = {k.removeprefix("dense/"): v for k, v in summary.items() if k.startswith("dense/")}
        if not metrics:
            problems.append(f"{project}/{run.id}: no metrics logged (state {run.state})")
            continue
        records.append({"status": "done" if run.state == "finished" else run.state, "config": dict(run.config),
                        "metrics": metrics, "dense_metrics": dense,
                        "params": {"removed_fraction": summary.get("removed_fraction")},
                        "timings": {}, "_path": f"{project}/{run.id}"})
    return records, problems


def _is_metric(key: str) -> bool:
    return key.startswith(("ppl/", "lm_eval/"))


def _natural(path: Path) -> list:
    """Sort key: '2_x' before '10_x' (Hydra numbers sweep jobs without padding)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def method(record: dict[str, Any]) -> str:
    """The published method's name (``method=`` preset), else "allocator x factorizer"."""
    cfg = record.get("config", {})
    return cfg.get("method_name") or (f"{cfg.get('allocator', {}).get('name', '?')} x "
                                      f"{cfg.get('factorizer', {}).get('name', '?')}")


def rows(records: list[dict[str, Any]], only: list[str] | None = None) -> tuple[list[str], list[list[Any]]]:
    """The comparison table as raw values (None where a value is missing); ``only`` keeps the
    metrics whose name contains one of these strings."""
    metrics = sorted({m for r in records for m in r.get("metrics", {}) if not only or any(o in m for o in only)},
                     key=lambda m: (not m.startswith("ppl"), m))
    header = ["method", "allocator", "factorizer", "ratio", "removed", "status"]
    for m in metrics:
        header += [m, f"dense {m}", "x dense"]
    header += ["total s", "run"]
    table = []
    for r in records:
        cfg = r.get("config", {})
        row = [cfg.get("method_name") or "-", cfg.get("allocator", {}).get("name", "?"),
               cfg.get("factorizer", {}).get("name", "?"),
               cfg.get("ratio"), r.get("params", {}).get("removed_fraction"), r["status"]]
        for m in metrics:
            value, dense = r.get("metrics", {}).get(m), r.get("dense_metrics", {}).get(m)
            row += [value, dense, value / dense if value is not None and dense else None]
        row += [r.get("timings", {}).get("total_s"), r.get("_path")]
        table.append(row)
    return header, table


def markdown(header: list[str], table: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(v) for v in row) + " |" for row in table]
    return "\n".join(lines)


def to_csv(header: list[str], table: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in table])
    return buffer.getvalue()


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(records: list[dict[str, Any]], out: Path, ranks_of: str | None = None) -> list[Path]:
    """PNG files: each metric vs ratio, and the ranks per layer of one run."""
    from lrc.results import plots

    done = [r for r in records if r.get("status") == "done"]
    points = [{"method": method(r), "ratio": r["config"].get("ratio"), **r.get("metrics", {})} for r in done]
    written = []
    metrics = sorted({m for r in done for m in r.get("metrics", {})})
    for m in [m for m in metrics if m.startswith("ppl/")] + [m for m in metrics if m == "lm_eval/mean_acc"]:
        dense = next((r["dense_metrics"].get(m) for r in done if r.get("dense_metrics", {}).get(m)), None)
        fig = plots.metric_vs_ratio(points, m, dense=dense, log_scale=m.startswith("ppl/"))
        written.append(_save(fig, out / f"{m.replace('/', '_')}_vs_ratio.png"))
    chosen = (next((r for r in done if ranks_of in r.get("_path", "")), None) if ranks_of is not None
              else min(done, key=lambda r: _first_ppl(r), default=None))
    if chosen is not None and chosen.get("ranks"):
        title = f"ranks per layer: {method(chosen)} at ratio {chosen['config'].get('ratio')}"
        written.append(_save(plots.ranks_per_layer(chosen["ranks"], title), out / "ranks_per_layer.png"))
    return written


def _first_ppl(record: dict[str, Any]) -> float:
    """The run's first perplexity (inf when it has none): picks the best run to plot."""
    values = [v for k, v in sorted(record.get("metrics", {}).items()) if k.startswith("ppl/")]
    return values[0] if values else float("inf")


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrc.report", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder holding result.json files (searched recursively), "
                                       "or wandb:ENTITY/PROJECT")
    parser.add_argument("--out", type=Path, default=None,
                        help="write report.md, report.csv and the PNG plots here (default: print the table only)")
    parser.add_argument("--ranks-of", default=None, help="plot the ranks per layer of the run whose path contains this "
                                                          "(default: the lowest perplexity)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated parts of metric names to keep in the table, e.g. ppl/,mean_acc")
    args = parser.parse_args(argv)
    if args.source.startswith(WANDB_PREFIX):
        records, problems = collect_wandb(args.source.removeprefix(WANDB_PREFIX))
    else:
        if not Path(args.source).is_dir():
            print(f"lrc: error: results folder {args.source!r} does not exist", file=sys.stderr)
            return 2
        records, problems = collect(Path(args.source))
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not records:
        print(f"lrc: error: no result.json records under {args.source}", file=sys.stderr)
        return 2
    for r in records:
        if r["status"] != "done":
            print(f"failed run {r.get('_path')}: {r.get('error', r['status'])}", file=sys.stderr)
    header, table = rows(records, args.metrics.split(",") if args.metrics else None)
    text = markdown(header, table)
    print(text)
    if args.out is not None:
        for path in write_report(records, args.out, args.ranks_of, args.metrics.split(",") if args.metrics else None):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def write_report(records: list[dict[str, Any]], out: Path, ranks_of: str | None = None,
                 only: list[str] | None = None) -> list[Path]:
    """``report.md``, ``report.csv`` and the PNG plots of ``records`` in ``out``, atomically."""
    header, table = rows(records, only)
    atomic_write_bytes(out / "report.md", (markdown(header, table) + "\n").encode())
    atomic_write_bytes(out / "report.csv", to_csv(header, table).encode())
    return [out / "report.md", out / "report.csv", *plot(records, out, ranks_of)]


if __name__ == "__main__":
    sys.exit(main())
