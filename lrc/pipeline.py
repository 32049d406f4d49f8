"""The whole run as one function: statistics -> allocate -> factorize -> benchmark -> record.

Library code: plain typed arguments, no Hydra, usable from a notebook.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrc.allocators.base import Allocator, MatrixInfo
from lrc.budget import Budget
from lrc.compress.layerwise import LayerwiseOptions, ResidentBlocks, check_layerwise
from lrc.compress.stage import (
    STATS_MODE,
    CompressionJob,
    check_streamed,
    compress,
    on_device,
    statistics_cached,
    time_plain_forward,
)
from lrc.data.windows import Calibration
from lrc.errors import BudgetError
from lrc.eval.perplexity import PerplexityBenchmark, run_benchmarks
from lrc.factorizers.base import Factorizer
from lrc.files import JsonCache, cache_key
from lrc.model.adapters import find_targets
from lrc.model.loading import LoadedModel
from lrc.resources import Stopwatch
from lrc.results.plots import ranks_per_layer
from lrc.results.records import trial_columns
from lrc.results.tracking import Tracker
from lrc.stats.cache import StatisticsCache

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Everything a run produced, ready for the record."""

    ranks: dict[str, int]
    params: dict[str, float]
    metrics: dict[str, float]
    dense_metrics: dict[str, float]
    timings: dict[str, float]
    memory: dict[str, int] = field(default_factory=dict)  # peak bytes per stage (see Stopwatch)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)  # plans scored by a search allocator


def model_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the model, tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def dense_metrics(loaded: LoadedModel, benchmarks: list[PerplexityBenchmark], cache: JsonCache,
                  placed: Callable[[], Any] = nullcontext) -> tuple[dict, bool]:
    """The dense model's benchmark metrics, computed once per (model, benchmarks) and cached;
    ``placed()`` is the context the model is evaluated in (layer-wise mode: on the device)."""
    key = cache_key({"model": loaded.identity, "benchmarks": [b.describe() for b in benchmarks], "protocol": 1})
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    with placed():
        metrics = run_benchmarks(loaded.model, loaded.tokenizer, benchmarks)
    cache.save(key, metrics)
    return metrics, False


def compress_and_evaluate(loaded: LoadedModel, factorizer: Factorizer, allocator: Allocator, ratio: float,
                          calibration: Calibration, benchmarks: list[PerplexityBenchmark], cache_dir: Path,
                          tracker: Tracker | None = None, measure_forward: bool = True,
                          layerwise: LayerwiseOptions | None = None, device: torch.device | None = None
                          ) -> Outcome:
    """Compress ``loaded.model`` in place to remove ``ratio`` of its target parameters; evaluate it.

    With ``layerwise.enabled`` the model stays on the host and one decoder block at a time
    goes to ``device`` (default: where the model is) for statistics and factorization.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    layerwise = layerwise or LayerwiseOptions()
    device = device or loaded.device
    watch, diagnostics = Stopwatch(device), {"mode": "layerwise" if layerwise.enabled else STATS_MODE}
    targets = find_targets(model)
    bias_before = {t.name: _bias_size(model.get_submodule(t.name)) for t in targets}
    budget = Budget({t.name: t.shape for t in targets}, ratio,
                    extra={t.name: factorizer.added_params(t.shape, bias_before[t.name] > 0) for t in targets})
    matrices = [MatrixInfo(t.name, t.shape, t.block, t.sublayer, t.kind) for t in targets]
    diagnostics["shapes"] = {t.name: list(t.shape) for t in targets}  # the budget can be re-checked from the record
    diagnostics["added_params"] = {name: e for name, e in budget.extra.items() if e}
    allocator.check(matrices, budget)  # before any heavy work
    kinds = frozenset(factorizer.needs | allocator.needs)
    home = loaded.blocks or ResidentBlocks()  # where blocks live between visits to the device
    streamed = home.streamed
    if layerwise.enabled or streamed:
        check_layerwise(kinds)
        check_streamed(streamed, layerwise, benchmarks, allocator)
    moves = layerwise.enabled and not streamed  # the whole model visits the device for benchmarks
    model_before, bytes_before = model_size(model)

    with watch("calibration_s"):
        windows = calibration.windows(tokenizer)  # validates the data before any heavy work
        validation = allocator.validation
        held_out = (calibration.validation_windows(tokenizer, validation.nsamples, validation.seqlen)
                    if validation is not None else None)
    with watch("dense_benchmark_s"):
        dense, diagnostics["dense_metrics_cached"] = dense_metrics(loaded, benchmarks, JsonCache(cache_dir, "dense"),
                                                                   lambda: on_device(model, device, moves))
    log.info("dense model: %s", _fmt(dense))

    if kinds and measure_forward and not statistics_cached(loaded, targets, calibration, kinds, cache_dir,
                                                            layerwise):
        time_plain_forward(model, windows, calibration.batch_size, device, layerwise.enabled, watch, home)
    done = compress(CompressionJob(loaded, targets, factorizer, allocator, budget, matrices, calibration, windows,
                                   held_out, kinds, StatisticsCache(cache_dir), device, layerwise, watch,
                                   diagnostics, tracker, home))
    if layerwise.enabled:
        watch.timings["block_transfer_s"] = home.seconds
    plan, errors, damping = done.plan, done.errors, done.damping
    if damping:
        log.warning("whitening needed damping for %d matrices (max %.3g x mean diag)", len(damping),
                    max(damping.values()))
    diagnostics.update(truncation_error=errors, damping=damping)

    target_after = sum(_size(model.get_submodule(t.name)) - bias_before[t.name] for t in targets)
    if target_after != budget.params_after(plan):
        raise BudgetError(f"swapped modules store {target_after} parameters, the rank plan "
                          f"{budget.params_after(plan)}")
    model_after, bytes_after = model_size(model)
    params = {"target_before": budget.params_before, "target_after": target_after,
              "model_before": model_before, "model_after": model_after,
              "model_bytes_before": bytes_before, "model_bytes_after": bytes_after,
              "removed_fraction": budget.removed_fraction(plan)}
    log.info("removed %.4f of %d target parameters (budget %.4f)", params["removed_fraction"],
             budget.params_before, ratio)

    with watch("benchmark_s"), on_device(model, device, moves):
        metrics = run_benchmarks(model, tokenizer, benchmarks)
    log.info("compressed model: %s", _fmt(metrics))
    trials = done.scorer.trials if done.scorer is not None else []
    if tracker is not None:
        tracker.log_metrics({**metrics, **{f"dense/{k}": v for k, v in dense.items()},
                             "removed_fraction": params["removed_fraction"]})
        tracker.log_table("rank_plan", ["module", "block", "kind", "out", "in", "rank", "truncation_error"],
                          [[t.name, t.block, t.kind, t.shape[0], t.shape[1], plan[t.name], errors.get(t.name)]
                           for t in targets])
        tracker.log_figure("ranks_per_layer", ranks_per_layer(plan, f"ranks per layer at ratio {ratio:g}"))
        for source in (*benchmarks, allocator):
            for key, (columns, rows) in getattr(source, "tables", dict)().items():
                tracker.log_table(key, columns, rows)
        if trials:
            columns = trial_columns(trials)
            tracker.log_table("trials", columns, [[row.get(c) for c in columns] for row in trials])
    return Outcome(ranks=dict(plan), params=params, metrics=metrics, dense_metrics=dense,
                   timings=watch.timings, memory=watch.memory, diagnostics=diagnostics, trials=trials)


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bias_size(module: nn.Module) -> int:
    """The bias a target linear had before compression (not part of the budget)."""
    bias = getattr(module, "bias", None)
    return bias.numel() if bias is not None else 0


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items())
