"""Shared fixtures: an isolated cache, W&B disabled unless a test turns it on, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    cache = os.environ.get("LRC_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "lrc-cache")
    monkeypatch.setenv("LRC_CACHE_DIR", cache)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny():
    from lrc.model.loading import tiny_random

    return tiny_random(device="cpu")


def compose(overrides: list[str]):
    """Compose the project config like `python -m lrc.run <overrides>` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a real run
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def spec(factorizer, allocator, ratio, calibration, benchmarks, cache_dir, measure_forward=True, layerwise=None,
         device=None, run_dir=None):
    """A RunSpec from the parts a test varies (the pipeline's own arguments are small typed objects)."""
    from lrc.compress.layerwise import LayerwiseOptions
    from lrc.compress.stage import Method
    from lrc.pipeline import RunSpec, Settings

    settings = Settings(cache_dir=cache_dir, device=device, layerwise=layerwise or LayerwiseOptions(),
                        measure_forward=measure_forward, run_dir=run_dir)
    return RunSpec(Method(factorizer, allocator), ratio, calibration, benchmarks, settings)
