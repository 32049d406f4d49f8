"""The run record, ``result.json``: schema, atomic write, resume check.

Schema (later issues, tests and users rely on it)::

    {"status": "done" | "failed", "config": {...}, "ranks": {module: rank},
     "params": {"target_before", "target_after", "model_before", "model_after", "removed_fraction"},
     "metrics": {"ppl/<benchmark>": float, ...}, "dense_metrics": {same keys},
     "timings": {"load_s", "calibration_s", "allocation_s", "factorization_s", "benchmark_s", "total_s", ...},
     "versions": {...}}

Optional: "diagnostics" (per-matrix truncation errors, dampings, the allocator's report) and
"trials" (one row per plan a search allocator scored; also written as ``trials.csv``).
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from lrc.files import atomic_write_bytes, atomic_write_json
from lrc.paths import RESULT_FILE, TRIALS_FILE

TIMING_KEYS = ("load_s", "calibration_s", "allocation_s", "factorization_s", "benchmark_s", "total_s")  # always present


def versions() -> dict[str, str]:
    """The versions that made a record (installed distributions, and the git commit when known)."""
    import torch
    import transformers

    import lrc

    found = {"lrc": lrc.__version__, "python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "hydra": importlib.metadata.version("hydra-core")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            found["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def write_record(output_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(output_dir) / RESULT_FILE
    atomic_write_json(path, record)
    return path


def trial_columns(trials: list[dict[str, Any]]) -> list[str]:
    """Every key any trial row has, in first-seen order (rows of different searches differ)."""
    return list(dict.fromkeys(k for row in trials for k in row))


def write_trials(output_dir: Path, trials: list[dict[str, Any]]) -> Path:
    """The scored plans of a search allocator as a CSV table (one row per trial), atomically."""
    columns = trial_columns(trials)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(trials)
    path = Path(output_dir) / TRIALS_FILE
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
