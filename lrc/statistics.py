"""Calibration statistics: forward hooks collect what the chosen methods declare they need.

Kinds collected so far:

* ``gram`` - G = sum_t x_t x_tᵀ of each shared linear input (one G for q/k/v, one for
  gate/up). Each batch's Gram is one float32 matrix product (the fast path on every
  device); the per-batch results are summed in float64, so the accumulation over many
  batches loses nothing.

Hooks are always removed (``finally``). Results are cached on disk by
:class:`StatisticsCache`, keyed by (model, calibration, targets, kinds, mode).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lrc.adapters import TargetLinear
from lrc.errors import ConfigError
from lrc.factorizers.base import InputStatistics

log = logging.getLogger(__name__)

KINDS = frozenset({"gram"})


class GramAccumulator:
    """Forward pre-hook adding XᵀX of a linear's input to a float64 sum."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.total = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        self.total += (x.T @ x).double()
        self.tokens += x.shape[0]


@contextmanager
def hooks_on(model: nn.Module, hooks: dict[str, object]):
    """Register forward pre-hooks ``{module name: hook}``; remove them whatever happens."""
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def batches(windows: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size]


def decoder_forward(model: nn.Module, windows: torch.Tensor, batch_size: int, desc: str = "forward") -> float:
    """Run the decoder (no LM head) over ``windows``; return the seconds it took."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.inference_mode():
        n_batches = -(-windows.shape[0] // batch_size)
        for batch in tqdm(batches(windows, batch_size), total=n_batches, desc=desc, leave=False, disable=None):
            decoder(input_ids=batch.to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def collect_statistics(model: nn.Module, targets: Sequence[TargetLinear], windows: torch.Tensor,
                       kinds: Iterable[str], batch_size: int = 4) -> dict[str, InputStatistics]:
    """One calibration pass collecting ``kinds`` for every shared input of ``targets``.

    Returns ``{group name: InputStatistics}``; a linear reads the statistics of its ``group``.
    """
    kinds = frozenset(kinds)
    unknown = kinds - KINDS
    if unknown:
        raise ConfigError(f"unknown statistics kinds {sorted(unknown)}; known: {sorted(KINDS)}")
    groups = {t.group: t.shape[1] for t in targets}
    device = next(model.parameters()).device
    accumulators = {g: GramAccumulator(n, device) for g, n in groups.items()} if "gram" in kinds else {}
    with hooks_on(model, accumulators):
        decoder_forward(model, windows, batch_size, desc="calibration")
    stats = {}
    for group in groups:
        acc = accumulators.get(group)
        stats[group] = InputStatistics(tokens=acc.tokens if acc else windows.numel(),
                                       gram=acc.total.cpu() if acc else None)
    return stats
