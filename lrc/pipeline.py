"""The whole run as one function: statistics -> allocate -> factorize -> benchmark -> record.

Library code: plain typed arguments, no Hydra, usable from a notebook.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrc.adapters import TargetLinear, find_targets
from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo
from lrc.budget import Budget, check_plan
from lrc.cache import JsonCache, StatisticsCache, cache_key
from lrc.calibration import Calibration
from lrc.errors import BudgetError
from lrc.evaluation import PerplexityBenchmark, run_benchmarks
from lrc.factorizers.base import Decomposition, Factorizer, InputStatistics
from lrc.models import LoadedModel
from lrc.plots import ranks_per_layer
from lrc.records import trial_columns
from lrc.scoring import PlanScorer
from lrc.statistics import collect_statistics, decoder_forward, for_target, sublayer_cosine
from lrc.swap import apply_plan
from lrc.tracking import Tracker

log = logging.getLogger(__name__)
STATS_MODE = "whole-model"
# Most bytes of decompositions held between allocation and factorization when the allocator
# only needs spectra (beyond it, matrices are decomposed a second time instead).
KEEP_DECOMPOSITIONS_BYTES = 8 * 2**30


@dataclass
class Outcome:
    """Everything a run produced, ready for the record."""

    ranks: dict[str, int]
    params: dict[str, float]
    metrics: dict[str, float]
    dense_metrics: dict[str, float]
    timings: dict[str, float]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)  # plans scored by a search allocator


class Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, key: str):
        watch = self

        class _Lap:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                watch.timings[key] = watch.timings.get(key, 0.0) + time.perf_counter() - self.start

        return _Lap()


def model_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the model, tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def dense_metrics(loaded: LoadedModel, benchmarks: list[PerplexityBenchmark], cache: JsonCache) -> tuple[dict, bool]:
    """The dense model's benchmark metrics, computed once per (model, benchmarks) and cached."""
    key = cache_key({"model": loaded.identity, "benchmarks": [b.describe() for b in benchmarks], "protocol": 1})
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    metrics = run_benchmarks(loaded.model, loaded.tokenizer, benchmarks)
    cache.save(key, metrics)
    return metrics, False


def calibration_statistics(loaded: LoadedModel, targets: list[TargetLinear], calibration: Calibration,
                           windows: torch.Tensor, kinds: frozenset[str], cache: StatisticsCache
                           ) -> tuple[dict[str, InputStatistics], frozenset[str]]:
    """Statistics of ``kinds``: cached kinds are loaded, the rest computed in one pass and cached.

    Returns (statistics, the kinds that came from the cache).
    """
    base = {"model": loaded.identity, "calibration": calibration.describe(), "mode": STATS_MODE,
            "targets": sorted({(t.group, t.shape[1]) for t in targets})}
    return cache.get_or_compute(
        base, kinds, lambda missing: collect_statistics(loaded.model, targets, windows, missing,
                                                        calibration.batch_size))


def compress_and_evaluate(loaded: LoadedModel, factorizer: Factorizer, allocator: Allocator, ratio: float,
                          calibration: Calibration, benchmarks: list[PerplexityBenchmark], cache_dir: Path,
                          tracker: Tracker | None = None, measure_forward: bool = True) -> Outcome:
    """Compress ``loaded.model`` in place to remove ``ratio`` of its target parameters; evaluate it."""
    model, tokenizer = loaded.model, loaded.tokenizer
    watch, diagnostics = Stopwatch(), {}
    targets = find_targets(model)
    by_name = {t.name: t for t in targets}
    budget = Budget({t.name: t.shape for t in targets}, ratio)
    matrices = [MatrixInfo(t.name, t.shape, t.block, t.sublayer, t.kind) for t in targets]
    allocator.check(matrices, budget)  # before any heavy work
    model_before, bytes_before = model_size(model)

    kinds = frozenset(factorizer.needs | allocator.needs)
    stats: dict[str, InputStatistics] = {}
    with watch("calibration_s"):
        windows = calibration.windows(tokenizer)  # validates the data before any heavy work
        validation = allocator.validation
        held_out = (calibration.validation_windows(tokenizer, validation.nsamples, validation.seqlen)
                    if validation is not None else None)
        if kinds:
            stats, cached = calibration_statistics(loaded, targets, calibration, windows, kinds,
                                                   StatisticsCache(cache_dir))
            diagnostics["statistics_cached"] = sorted(cached)
            diagnostics["statistics_computed"] = sorted(kinds - cached)
    if kinds and measure_forward and diagnostics["statistics_computed"]:
        watch.timings["calibration_forward_s"] = decoder_forward(model, windows, calibration.batch_size)
        log.info("statistics took %.1fs, a plain forward over the same %d tokens %.1fs (ratio %.2f)",
                 watch.timings["calibration_s"], windows.numel(), watch.timings["calibration_forward_s"],
                 watch.timings["calibration_s"] / watch.timings["calibration_forward_s"])

    with watch("dense_benchmark_s"):
        dense, diagnostics["dense_metrics_cached"] = dense_metrics(loaded, benchmarks, JsonCache(cache_dir, "dense"))
    log.info("dense model: %s", _fmt(dense))

    def decompose(name: str) -> Decomposition:
        weight = model.get_submodule(name).weight
        return factorizer.decompose(weight, for_target(stats, by_name[name]))

    decompositions: dict[str, Decomposition] = {}
    spectra: dict[str, torch.Tensor] = {}
    if allocator.spectrum_source == "factorizer" or validation is not None:  # every matrix, once
        with watch("factorization_s"):
            spectra = decompose_all(targets, decompose, decompositions, keep_all=validation is not None)
    with watch("allocation_s"):
        if allocator.spectrum_source == "weight":
            spectra = {t.name: torch.linalg.svdvals(model.get_submodule(t.name).weight.detach().double())
                       for t in targets}
        if allocator.spectrum_source is not None:
            matrices = [replace(m, spectrum=spectra[m.name]) for m in matrices]
        scorer = (PlanScorer(model, targets, decompositions, held_out, budget, validation.batch_size,
                             validation.kl_weight, tracker) if validation is not None else None)
        context = AllocationContext(sublayer_cosine=sublayer_cosine(stats), score=scorer)
        plan = allocator.allocate(matrices, budget, context)
        check_plan(plan, budget)
    if allocator.report:
        diagnostics["allocation"] = allocator.report
        log.info("allocation: %s", _brief(allocator.report))

    with watch("factorization_s"):
        errors, damping = apply_plan(model, targets, plan, decompose, decompositions)
    decompositions.clear()
    if damping:
        log.warning("whitening needed damping for %d matrices (max %.3g x mean diag)", len(damping),
                    max(damping.values()))
    diagnostics.update(truncation_error=errors, damping=damping)

    target_after = sum(_stored(model.get_submodule(t.name)) for t in targets)
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

    with watch("benchmark_s"):
        metrics = run_benchmarks(model, tokenizer, benchmarks)
    log.info("compressed model: %s", _fmt(metrics))
    trials = scorer.trials if scorer is not None else []
    if tracker is not None:
        tracker.log_metrics({**metrics, **{f"dense/{k}": v for k, v in dense.items()},
                             "removed_fraction": params["removed_fraction"]})
        tracker.log_table("rank_plan", ["module", "block", "kind", "out", "in", "rank", "truncation_error"],
                          [[t.name, t.block, t.kind, t.shape[0], t.shape[1], plan[t.name], errors.get(t.name)]
                           for t in targets])
        tracker.log_figure("ranks_per_layer", ranks_per_layer(plan, f"ranks per layer at ratio {ratio:g}"))
        for bench in benchmarks:
            for key, (columns, rows) in getattr(bench, "tables", dict)().items():
                tracker.log_table(key, columns, rows)
        if trials:
            columns = trial_columns(trials)
            tracker.log_table("trials", columns, [[row.get(c) for c in columns] for row in trials])
    return Outcome(ranks=dict(plan), params=params, metrics=metrics, dense_metrics=dense,
                   timings=watch.timings, diagnostics=diagnostics, trials=trials)


def decompose_all(targets: list[TargetLinear], decompose: Callable[[str], Decomposition],
                  decompositions: dict[str, Decomposition], keep_all: bool,
                  keep_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Decompose every target once; return the spectra.

    Decompositions are kept in ``decompositions`` for the factorization step up to
    ``keep_bytes`` (the rest is decomposed again there), or all of them when ``keep_all``
    (an allocator that scores plans needs every one); kept ones live on the CPU, so a GPU
    holds one decomposition at a time.
    """
    spectra, held = {}, 0
    keep_bytes = KEEP_DECOMPOSITIONS_BYTES if keep_bytes is None else keep_bytes
    for t in tqdm(targets, desc="decompose", leave=False, disable=None):
        dec = decompose(t.name)
        spectra[t.name] = dec.spectrum.detach().cpu()
        if keep_all or held + dec.nbytes <= keep_bytes:
            decompositions[t.name] = dec.to("cpu")
            held += dec.nbytes
    if len(decompositions) < len(targets):
        log.info("kept %d of %d decompositions (%.1f GiB); the rest are recomputed when factorizing",
                 len(decompositions), len(targets), held / 2**30)
    return spectra


def _stored(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))


def _brief(report: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in report.items() if not isinstance(v, dict))


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items())
