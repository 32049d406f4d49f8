"""OmegaConf resolvers the config files use; registered when :mod:`lrc.config` is imported."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf


def sweep_group() -> str | None:
    """The sweep's output folder (e.g. ``multirun/2026-11-23/13-00-00``) in a multirun, else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return group_of(Path(HydraConfig.get().sweep.dir))


def group_of(sweep: Path) -> str:
    """The W&B group of a sweep's runs: its folder, relative to ``outputs/`` when under it."""
    return str(sweep.relative_to("outputs") if sweep.parts[:1] == ("outputs",) else sweep)


def job_dirname(overrides: str, limit: int = 200) -> str:
    """A sweep job's folder name from its overrides: one path component whatever the values
    (``/`` becomes ``_``), shortened with a hash suffix when too long for a file name."""
    name = overrides.replace(os.sep, "_").replace("\0", "") or "run"
    if len(name.encode()) > limit:
        digest = hashlib.sha256(overrides.encode()).hexdigest()[:12]
        name = name.encode()[: limit - 13].decode(errors="ignore") + "-" + digest
    return name


OmegaConf.register_new_resolver("lrc_sweep_group", sweep_group, replace=True)  # conf/logger/wandb.yaml
OmegaConf.register_new_resolver("lrc_job_dirname", job_dirname, replace=True)  # conf/config.yaml hydra.sweep.subdir
