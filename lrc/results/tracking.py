"""Experiment tracking with the real W&B client (offline by default; ``wandb sync`` uploads).

A :class:`Tracker` is a context manager, so the W&B run is always finished, with a
failure exit code when the run raised, and one failed job never spoils a sweep.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from lrc.results.outcome import Outcome
from lrc.results.plots import ranks_per_layer
from lrc.results.records import trial_columns

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


class Tracker:
    """No-op tracker (``logger=none``); also the interface of :class:`WandbTracker`."""

    def __init__(self, output_dir: Path | None = None, config: dict[str, Any] | None = None) -> None:
        self.output_dir, self.config = output_dir, config

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float]) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_figure(self, key: str, figure: Any) -> None: ...

    def log_image(self, key: str, path: Path) -> None: ...


def run_id(output_dir: Path) -> str:
    """The W&B run id of a run folder (stable across requeues and re-runs of that folder)."""
    return hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


class WandbTracker(Tracker):
    def __init__(self, output_dir: Path, config: dict[str, Any], project: str = "lrc", mode: str = "offline",
                 group: str | None = None, run_name: str | None = None, entity: str | None = None,
                 tags: list[str] | None = None) -> None:
        mode = os.environ.get("WANDB_MODE", mode)
        if mode not in MODES:
            raise ValueError(f"wandb mode {mode!r} is not one of {MODES}")
        # one W&B run per run folder: a requeued or re-run job resumes it instead of starting another
        self.settings = {"project": project, "mode": mode, "group": group, "name": run_name or None, "entity": entity,
                         "tags": tags, "dir": str(output_dir), "config": config, "id": run_id(output_dir),
                         "resume": "allow"}
        self.run = None

    def __enter__(self) -> WandbTracker:
        import wandb

        Path(self.settings["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(**self.settings)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if exc_type else 0)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.log(metrics)
        self.run.summary.update(metrics)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_figure(self, key: str, figure: Any) -> None:
        """A matplotlib figure, logged as an image (PNG)."""
        import io

        import wandb
        from PIL import Image

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        buffer.seek(0)
        self.run.log({key: wandb.Image(Image.open(buffer))})

    def log_image(self, key: str, path: Path) -> None:
        """An image file (e.g. a PNG plot of the sweep report)."""
        import wandb

        self.run.log({key: wandb.Image(str(path))})


def log_outcome(tracker: Tracker, outcome: Outcome, ratio: float) -> None:
    """Everything a run logs to W&B, from its outcome: one step per scored plan (``trial/*``),
    the final metrics (compressed, ``dense/*``, removed fraction), the tables and the
    ranks-per-layer figure."""
    for row in outcome.trials:
        tracker.log_metrics({f"trial/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
    finetune = outcome.diagnostics.get("finetune") or {}
    for step, loss in enumerate(finetune.get("losses", [])):  # the recovery fine-tuning's loss curve
        tracker.log_metrics({"finetune/loss": loss, "finetune/step": step})
    if finetune.get("metrics_before"):
        tracker.log_metrics({f"before_finetune/{k}": v for k, v in finetune["metrics_before"].items()})
    tracker.log_metrics({**outcome.metrics, **{f"dense/{k}": v for k, v in outcome.dense_metrics.items()},
                         "removed_fraction": outcome.params["removed_fraction"]})
    for key, (columns, rows) in outcome.tables.items():
        tracker.log_table(key, columns, rows)
    if outcome.trials:
        columns = trial_columns(outcome.trials)
        tracker.log_table("trials", columns, [[row.get(c) for c in columns] for row in outcome.trials])
    tracker.log_figure("ranks_per_layer", ranks_per_layer(outcome.ranks, f"ranks per layer at ratio {ratio:g}"))
