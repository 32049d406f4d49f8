"""Collect ``result.json`` files under a folder into one markdown comparison table.

``python -m lrc.report outputs/multirun/2026-11-23/10-00-00`` prints one row per run:
allocator, factorizer, ratio, removed fraction, every metric (with the dense value and the
ratio to it) and the seconds the run took. Unreadable records are reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from lrc.records import RESULT_FILE

log = logging.getLogger(__name__)


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


def _natural(path: Path) -> list:
    """Sort key: '2_x' before '10_x' (Hydra numbers sweep jobs without padding)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    metrics = sorted({m for r in records for m in r.get("metrics", {})})
    header = ["allocator", "factorizer", "ratio", "removed", "status"]
    for m in metrics:
        header += [m, f"dense {m}", "x dense"]
    header += ["total s"]
    table = []
    for r in records:
        cfg = r.get("config", {})
        row = [str(cfg.get("allocator", {}).get("name", "?")), str(cfg.get("factorizer", {}).get("name", "?")),
               f"{cfg.get('ratio', float('nan')):g}", _num(r.get("params", {}).get("removed_fraction")), r["status"]]
        for m in metrics:
            value, dense = r.get("metrics", {}).get(m), r.get("dense_metrics", {}).get(m)
            row += [_num(value), _num(dense), _num(value / dense if value and dense else None)]
        row.append(_num(r.get("timings", {}).get("total_s")))
        table.append(row)
    return header, table


def markdown(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrc.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding result.json files (searched recursively)")
    args = parser.parse_args(argv)
    records, problems = collect(args.root)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not records:
        print(f"lrc: error: no result.json records under {args.root}", file=sys.stderr)
        return 2
    print(markdown(*rows(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
