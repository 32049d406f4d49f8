"""Compare runs: one table (markdown and CSV) and PNG plots from ``result.json`` files or W&B.

    python -m lrc.report outputs/multirun/allocators            # a folder, searched recursively
    python -m lrc.report wandb:ENTITY/PROJECT --out report/      # runs of a W&B project

One row per run: method (allocator x factorizer), ratio, removed fraction, status, every
metric with the dense value and the ratio to it, and the seconds the run took. A metric
with a standard error (zero-shot accuracies: ``<metric>_stderr``) gets a ``± se`` column
and a ``vs dense`` mark: ``n.s.`` where the run and the dense model differ by less than two
standard errors of the difference, sqrt(se_run² + se_dense²) (conservative: both are scored
on the same examples), else ``+`` or ``-``. Under the table, every pair of runs at the same
ratio is compared on the zero-shot summaries the same way. Plots: every perplexity and mean
zero-shot accuracy against the ratio (one line per method, error bars of ± 1 se), and the
ranks per layer of one run (``--ranks-of``, default the run with the lowest perplexity).
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
STDERR = "_stderr"
SUMMARIES = ("lm_eval/mean_acc_above_chance", "lm_eval/mean_acc")  # compared pairwise under the table


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


def _is_column(key: str) -> bool:
    """A metric shown as its own column (standard errors go beside their metric; chance levels
    are constants of a task and stay in result.json)."""
    return not key.endswith((STDERR, "/chance"))


def difference(a: float, se_a: float | None, b: float, se_b: float | None) -> tuple[float, float | None, str]:
    """(a - b, its standard error, mark): ``n.s.`` where |a - b| < 2 se, else ``+`` or ``-``
    (no mark without standard errors). Independent-sample se, sqrt(se_a² + se_b²)."""
    if se_a is None or se_b is None:
        return a - b, None, ""
    se = (se_a**2 + se_b**2) ** 0.5
    if abs(a - b) < 2 * se:
        return a - b, se, "n.s."
    return a - b, se, "+" if a > b else "-"


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
    metrics = sorted({m for r in records for m in r.get("metrics", {})
                      if _is_column(m) and (not only or any(o in m for o in only))},
                     key=lambda m: (not m.startswith("ppl"), m))
    with_se = {m for m in metrics if any(m + STDERR in r.get("metrics", {}) for r in records)}
    header = ["method", "allocator", "factorizer", "ratio", "removed", "status"]
    for m in metrics:
        header += [m, "± se", f"dense {m}", "x dense", "vs dense"] if m in with_se else [m, f"dense {m}", "x dense"]
    header += ["total s", "run"]
    table = []
    for r in records:
        cfg = r.get("config", {})
        row = [cfg.get("method_name") or "-", cfg.get("allocator", {}).get("name", "?"),
               cfg.get("factorizer", {}).get("name", "?"),
               cfg.get("ratio"), r.get("params", {}).get("removed_fraction"), r["status"]]
        values, dense_values = r.get("metrics", {}), r.get("dense_metrics", {})
        for m in metrics:
            value, dense = values.get(m), dense_values.get(m)
            ratio = value / dense if value is not None and dense else None
            if m not in with_se:
                row += [value, dense, ratio]
                continue
            se = values.get(m + STDERR)
            mark = (difference(value, se, dense, dense_values.get(m + STDERR))[2]
                    if value is not None and dense is not None else "")
            row += [value, se, dense, ratio, mark or None]
        row += [r.get("timings", {}).get("total_s"), r.get("_path")]
        table.append(row)
    return header, table


def pairwise(records: list[dict[str, Any]], metrics: tuple[str, ...] = SUMMARIES) -> tuple[list[str], list[list[Any]]]:
    """Every pair of finished runs at the same ratio compared on ``metrics`` that carry a
    standard error: the difference, its standard error and the mark of :func:`difference`."""
    header = ["metric", "ratio", "run a", "run b", "a - b", "± se", "mark"]
    table = []
    done = [r for r in records if r.get("status") == "done"]
    for m in metrics:
        scored = [r for r in done if m in r.get("metrics", {}) and m + STDERR in r["metrics"]]
        for i, a in enumerate(scored):
            for b in scored[i + 1:]:
                if a["config"].get("ratio") is None or a["config"].get("ratio") != b["config"].get("ratio"):
                    continue
                diff, se, mark = difference(a["metrics"][m], a["metrics"][m + STDERR],
                                            b["metrics"][m], b["metrics"][m + STDERR])
                table.append([m, a["config"].get("ratio"), method(a), method(b), diff, se, mark])
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
    for m in [m for m in metrics if m.startswith("ppl/")] + [m for m in metrics if m in SUMMARIES]:
        dense = next((r["dense_metrics"][m] for r in done if r.get("dense_metrics", {}).get(m) is not None), None)
        fig = plots.metric_vs_ratio(points, m, dense=dense, log_scale=m.startswith("ppl/"), stderr=m + STDERR)
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
    text = report_text(records, args.metrics.split(",") if args.metrics else None)
    print(text)
    if args.out is not None:
        for path in write_report(records, args.out, args.ranks_of, args.metrics.split(",") if args.metrics else None):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def report_text(records: list[dict[str, Any]], only: list[str] | None = None) -> str:
    """The comparison table, then the pairwise differences on the zero-shot summaries (if any)."""
    text = markdown(*rows(records, only))
    header, table = pairwise(records)
    if table:
        text += ("\n\nDifferences between runs at the same ratio (n.s.: less than two standard errors "
                 "of the difference):\n\n" + markdown(header, table))
    return text


def write_report(records: list[dict[str, Any]], out: Path, ranks_of: str | None = None,
                 only: list[str] | None = None) -> list[Path]:
    """``report.md``, ``report.csv`` and the PNG plots of ``records`` in ``out``, atomically."""
    header, table = rows(records, only)
    atomic_write_bytes(out / "report.md", (report_text(records, only) + "\n").encode())
    atomic_write_bytes(out / "report.csv", to_csv(header, table).encode())
    return [out / "report.md", out / "report.csv", *plot(records, out, ranks_of)]


if __name__ == "__main__":
    sys.exit(main())
