"""Experiment tracking with the real W&B client (offline by default; ``wandb sync`` uploads).

A :class:`Tracker` is a context manager, so the W&B run is always finished, with a
failure exit code when the run raised, and one failed job never spoils a sweep.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

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

    @property
    def run_dir(self) -> Path | None:
        return None


class WandbTracker(Tracker):
    def __init__(self, output_dir: Path, config: dict[str, Any], project: str = "lrc", mode: str = "offline",
                 group: str | None = None, run_name: str | None = None, entity: str | None = None,
                 tags: list[str] | None = None) -> None:
        mode = os.environ.get("WANDB_MODE", mode)
        if mode not in MODES:
            raise ValueError(f"wandb mode {mode!r} is not one of {MODES}")
        self.settings = {"project": project, "mode": mode, "group": group, "name": run_name or None, "entity": entity,
                         "tags": tags, "dir": str(output_dir), "config": config}
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

    @property
    def run_dir(self) -> Path | None:
        return Path(self.run.dir).parent if self.run is not None and self.run.dir else None
