"""The whole run as one function: statistics -> allocate -> factorize -> benchmark -> record.

Library code: plain typed arguments, no Hydra, usable from a notebook.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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
from lrc.errors import BudgetError, ConfigError
from lrc.evaluation import PerplexityBenchmark, run_benchmarks
from lrc.factorizers.base import Decomposition, Factorizer, InputStatistics
from lrc.layerwise import (
    LayerwiseCompressor,
    LayerwiseOptions,
    ResidentBlocks,
    block_statistics_key,
    check_layerwise,
    layerwise_forward,
)
from lrc.models import LoadedModel
from lrc.plots import ranks_per_layer
from lrc.records import trial_columns
from lrc.resources import peak_device_bytes, peak_host_bytes, reset_peak_device, reset_peak_host
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
    memory: dict[str, int] = field(default_factory=dict)  # peak bytes per stage (see Stopwatch)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)  # plans scored by a search allocator


class Stopwatch:
    """Seconds per stage (``watch("calibration_s")`` laps add up) and each stage's peak host
    and device memory (bytes, under ``memory["<stage>_peak_host"]`` / ``_peak_device``)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.memory: dict[str, int] = {}
        self.device = device

    def __call__(self, key: str):
        watch = self
        stage = key.removesuffix("_s")

        class _Lap:
            def __enter__(self):
                reset_peak_host()
                if watch.device is not None:
                    reset_peak_device(watch.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                watch.timings[key] = watch.timings.get(key, 0.0) + time.perf_counter() - self.start
                watch._peak(f"{stage}_peak_host", peak_host_bytes())
                if watch.device is not None and (dev := peak_device_bytes(watch.device)) is not None:
                    watch._peak(f"{stage}_peak_device", dev)

        return _Lap()

    def _peak(self, key: str, value: int) -> None:
        self.memory[key] = max(self.memory.get(key, 0), value)


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


def _statistics_key(loaded: LoadedModel, targets: list[TargetLinear], calibration: Calibration) -> dict[str, Any]:
    return {"model": loaded.identity, "calibration": calibration.describe(), "mode": STATS_MODE,
            "targets": sorted({(t.group, t.shape[1]) for t in targets})}


def calibration_statistics(loaded: LoadedModel, targets: list[TargetLinear], calibration: Calibration,
                           windows: torch.Tensor, kinds: frozenset[str], cache: StatisticsCache
                           ) -> tuple[dict[str, InputStatistics], frozenset[str]]:
    """Statistics of ``kinds``: cached kinds are loaded, the rest computed in one pass and cached.

    Returns (statistics, the kinds that came from the cache).
    """
    def compute(missing: frozenset[str]) -> dict[str, InputStatistics]:
        return collect_statistics(loaded.model, targets, windows, missing, calibration.batch_size)

    return cache.get_or_compute(_statistics_key(loaded, targets, calibration), kinds, compute)


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
    budget = Budget({t.name: t.shape for t in targets}, ratio)
    matrices = [MatrixInfo(t.name, t.shape, t.block, t.sublayer, t.kind) for t in targets]
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

    if kinds and measure_forward and not _statistics_cached(loaded, targets, calibration, kinds, cache_dir,
                                                            layerwise):
        _time_plain_forward(model, windows, calibration.batch_size, device, layerwise.enabled, watch, home)
    compress = _compress_layerwise if layerwise.enabled else _compress_whole_model
    done = compress(loaded, targets, factorizer, allocator, budget, matrices, calibration, windows, held_out,
                    kinds, StatisticsCache(cache_dir), device, layerwise, watch, diagnostics, tracker, home)
    if layerwise.enabled:
        watch.timings["block_transfer_s"] = home.seconds
    plan, errors, damping = done.plan, done.errors, done.damping
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
        for bench in benchmarks:
            for key, (columns, rows) in getattr(bench, "tables", dict)().items():
                tracker.log_table(key, columns, rows)
        if trials:
            columns = trial_columns(trials)
            tracker.log_table("trials", columns, [[row.get(c) for c in columns] for row in trials])
    return Outcome(ranks=dict(plan), params=params, metrics=metrics, dense_metrics=dense,
                   timings=watch.timings, memory=watch.memory, diagnostics=diagnostics, trials=trials)


@dataclass
class Compression:
    """What a compression stage did to the model."""

    plan: dict[str, int]
    errors: dict[str, float]
    damping: dict[str, float]
    scorer: PlanScorer | None = None


def check_streamed(streamed: bool, layerwise: LayerwiseOptions, benchmarks: list[Any], allocator: Allocator) -> None:
    """A model whose blocks are streamed from outside memory is never whole in memory."""
    if not streamed:
        return
    if not layerwise.enabled:
        raise ConfigError("this model streams its decoder blocks from outside memory: set layerwise.enabled=true")
    if benchmarks:
        raise ConfigError("this model streams its decoder blocks from outside memory and cannot be benchmarked "
                          "whole; run without benchmarks (the compressed blocks are in its offload folder)")
    if allocator.validation is not None:
        raise ConfigError("a search allocator scores plans on the whole model, which a streamed model never is")


@contextmanager
def on_device(model: nn.Module, device: torch.device, layerwise: bool) -> Iterator[None]:
    """In layer-wise mode the model lives on the host: put it on ``device`` for the duration
    (benchmarks and plan scoring run the whole model)."""
    if not layerwise:
        yield
        return
    host = next(model.parameters()).device
    model.to(device)
    try:
        yield
    finally:
        model.to(host)


def _time_plain_forward(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                        layerwise: bool, watch: Stopwatch, home: Any = None) -> None:
    """Time a plain forward over the calibration set (layer-wise when the run is), the floor the
    statistics stage is measured against."""
    moved = home.seconds if layerwise else 0.0
    with watch("calibration_forward_s"):
        if layerwise:
            layerwise_forward(model, windows, batch_size, device, home)
        else:
            decoder_forward(model, windows, batch_size)
    if layerwise:  # compute only: moving blocks is timed apart (block_transfer_s)
        watch.timings["calibration_forward_s"] -= home.seconds - moved
    forward = watch.timings["calibration_forward_s"]
    log.info("a plain %s forward over the %d calibration tokens took %.1fs", "layer-wise" if layerwise else "",
             windows.numel(), forward)


def _statistics_cached(loaded: LoadedModel, targets: list[TargetLinear], calibration: Calibration,
                       kinds: frozenset[str], cache_dir: Path, layerwise: LayerwiseOptions) -> bool:
    cache = StatisticsCache(cache_dir)
    if not layerwise.enabled:
        return cache.has(_statistics_key(loaded, targets, calibration), kinds)
    base = {"model": loaded.identity, "calibration": calibration.describe()}
    blocks = sorted({t.block for t in targets})
    return all(cache.has(block_statistics_key(base, i, [t for t in targets if t.block == i]), kinds)
               for i in blocks)


def _allocate(allocator: Allocator, matrices: list[MatrixInfo], budget: Budget, spectra: dict[str, torch.Tensor],
              cosine: dict[str, InputStatistics], scorer: PlanScorer | None,
              diagnostics: dict[str, Any]) -> dict[str, int]:
    if allocator.spectrum_source is not None:
        matrices = [replace(m, spectrum=spectra[m.name]) for m in matrices]
    plan = allocator.allocate(matrices, budget, AllocationContext(sublayer_cosine=sublayer_cosine(cosine),
                                                                  score=scorer))
    check_plan(plan, budget)
    if allocator.report:
        diagnostics["allocation"] = allocator.report
        log.info("allocation: %s", _brief(allocator.report))
    return dict(plan)


def _compress_whole_model(loaded: LoadedModel, targets: list[TargetLinear], factorizer: Factorizer,
                          allocator: Allocator, budget: Budget, matrices: list[MatrixInfo],
                          calibration: Calibration, windows: torch.Tensor, held_out: torch.Tensor | None,
                          kinds: frozenset[str], cache: StatisticsCache, device: torch.device,
                          layerwise: LayerwiseOptions, watch: Stopwatch, diagnostics: dict[str, Any],
                          tracker: Tracker | None, home: Any = None) -> Compression:
    """Statistics of every block in one forward pass, every matrix decomposed, allocate, factorize."""
    model = loaded.model
    by_name = {t.name: t for t in targets}
    stats: dict[str, InputStatistics] = {}
    if kinds:
        with watch("calibration_s"):
            stats, cached = calibration_statistics(loaded, targets, calibration, windows, kinds, cache)
        diagnostics["statistics_cached"] = sorted(cached)
        diagnostics["statistics_computed"] = sorted(kinds - cached)

    def decompose(name: str) -> Decomposition:
        weight = model.get_submodule(name).weight
        return factorizer.decompose(weight, for_target(stats, by_name[name]))

    validation = allocator.validation
    decompositions: dict[str, Decomposition] = {}
    spectra: dict[str, torch.Tensor] = {}
    if allocator.spectrum_source == "factorizer" or validation is not None:  # every matrix, once
        with watch("factorization_s"):
            spectra = decompose_all(targets, decompose, decompositions, keep_all=validation is not None)
    with watch("allocation_s"):
        if allocator.spectrum_source == "weight":
            spectra = {t.name: torch.linalg.svdvals(model.get_submodule(t.name).weight.detach().double())
                       for t in targets}
        scorer = (PlanScorer(model, targets, decompositions, held_out, budget, validation.batch_size,
                             validation.kl_weight, tracker) if validation is not None else None)
        plan = _allocate(allocator, matrices, budget, spectra, stats, scorer, diagnostics)
    with watch("factorization_s"):
        errors, damping = apply_plan(model, targets, plan, decompose, decompositions)
    decompositions.clear()
    return Compression(plan, errors, damping, scorer)


def _compress_layerwise(loaded: LoadedModel, targets: list[TargetLinear], factorizer: Factorizer,
                        allocator: Allocator, budget: Budget, matrices: list[MatrixInfo],
                        calibration: Calibration, windows: torch.Tensor, held_out: torch.Tensor | None,
                        kinds: frozenset[str], cache: StatisticsCache, device: torch.device,
                        layerwise: LayerwiseOptions, watch: Stopwatch, diagnostics: dict[str, Any],
                        tracker: Tracker | None, home: Any = None) -> Compression:
    """One block at a time on ``device``. An allocator that needs no calibration data gets its
    plan first and every block is factorized in one streaming pass; otherwise a first pass
    gathers spectra and sublayer statistics, the plan is made, and a second pass factorizes."""
    model = loaded.model
    base = {"model": loaded.identity, "calibration": calibration.describe()}
    compressor = LayerwiseCompressor(model, targets, windows, calibration.batch_size, kinds, device, cache, base,
                                     factorizer.decompose, factorizer.describe(), layerwise, watch, home)
    validation = allocator.validation
    decompositions: dict[str, Decomposition] = {}
    scorer = None
    plan_needs_data = (allocator.spectrum_source is not None or validation is not None
                       or bool(allocator.needs))
    if plan_needs_data:
        held = 0

        def keep(name: str, dec: Decomposition) -> bool:
            nonlocal held
            if validation is None and (layerwise.compressed_inputs or held + dec.nbytes > KEEP_DECOMPOSITIONS_BYTES):
                return False
            held += dec.nbytes
            return True

        spectra_from = ("factorizer" if allocator.spectrum_source == "factorizer" or validation is not None
                        else allocator.spectrum_source)
        compressor.run(None, keep=keep, decompositions=decompositions, spectra=spectra_from)
    with watch("allocation_s"):
        if validation is not None:
            with on_device(model, device, True):
                scorer = PlanScorer(model, targets, decompositions, held_out, budget, validation.batch_size,
                                    validation.kl_weight, tracker)
                plan = _allocate(allocator, matrices, budget, compressor.result.spectra, compressor.result.cosine,
                                 scorer, diagnostics)
        else:
            plan = _allocate(allocator, matrices, budget, compressor.result.spectra, compressor.result.cosine,
                             None, diagnostics)
    if layerwise.compressed_inputs:
        decompositions.clear()  # the statistics of the compressed model differ
    compressor.run(plan, decompositions=decompositions)
    decompositions.clear()
    result = compressor.result
    diagnostics["statistics_cached"] = sorted(result.statistics_cached - result.statistics_computed)
    diagnostics["statistics_computed"] = sorted(result.statistics_computed)
    diagnostics["calibration_passes"] = result.forward_passes
    return Compression(plan, result.errors, result.damping, scorer)


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
