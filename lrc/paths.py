"""Where lrc keeps things that outlive a run (never relative to the working directory)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit``, else $LRC_CACHE_DIR, else ~/.cache/lrc."""
    root = explicit or os.environ.get("LRC_CACHE_DIR") or Path.home() / ".cache" / "lrc"
    return Path(root).expanduser().resolve()


# A run folder holds these (besides Hydra's own files and wandb/):
RESULT_FILE = "result.json"  # the run record (lrc.results.records)
TRIALS_FILE = "trials.csv"  # the plans a search allocator scored
CHECKPOINT_DIR = "model"  # save=true: the compressed model (lrc.model.checkpoint)
