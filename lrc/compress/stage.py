"""The compression stage in its two modes: statistics -> spectra -> allocation -> factorization.

Whole-model mode collects every block's statistics in one forward pass; layer-wise mode
(:mod:`lrc.compress.layerwise`) streams one block at a time through the device. Both return a
:class:`Compression` (the plan, truncation errors, dampings, the plan scorer if any).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo
from lrc.budget import Budget, check_plan
from lrc.compress.layerwise import LayerwiseCompressor, LayerwiseOptions, block_statistics_key, layerwise_forward
from lrc.compress.scoring import PlanScorer, ScoreMemo
from lrc.compress.swap import apply_plan
from lrc.data.windows import Calibration
from lrc.errors import ConfigError
from lrc.factorizers.base import Decomposition, Factorizer
from lrc.model.adapters import TargetLinear
from lrc.model.loading import LoadedModel
from lrc.resources import Stopwatch
from lrc.results.tracking import Tracker
from lrc.stats.cache import StatisticsCache
from lrc.stats.collect import collect_statistics, decoder_forward, for_target
from lrc.stats.hooks import sublayer_cosine
from lrc.stats.types import InputStatistics

log = logging.getLogger(__name__)
STATS_MODE = "whole-model"
# Most bytes of decompositions held between allocation and factorization when the allocator
# only needs spectra (beyond it, matrices are decomposed a second time instead).
KEEP_DECOMPOSITIONS_BYTES = 8 * 2**30


@dataclass
class CompressionJob:
    """What either mode of the compression stage works from."""

    loaded: LoadedModel
    targets: list[TargetLinear]
    factorizer: Factorizer
    allocator: Allocator
    budget: Budget
    matrices: list[MatrixInfo]
    calibration: Calibration
    windows: torch.Tensor
    held_out: torch.Tensor | None  # validation windows of a search allocator
    kinds: frozenset[str]
    cache: StatisticsCache
    device: torch.device
    layerwise: LayerwiseOptions
    watch: Stopwatch
    diagnostics: dict[str, Any]
    tracker: Tracker | None
    home: Any  # where blocks live between visits to the device (layer-wise mode)


class DecompositionKeeper:
    """Whether to keep a decomposition until factorization: all of them for an allocator that
    scores plans, else up to KEEP_DECOMPOSITIONS_BYTES (the rest is decomposed again)."""

    def __init__(self, keep_all: bool) -> None:
        self.keep_all, self.held = keep_all, 0

    def __call__(self, name: str, dec: Decomposition) -> bool:
        if not self.keep_all and self.held + dec.nbytes > KEEP_DECOMPOSITIONS_BYTES:
            return False
        self.held += dec.nbytes
        return True


def statistics_key(loaded: LoadedModel, targets: list[TargetLinear], calibration: Calibration) -> dict[str, Any]:
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

    return cache.get_or_compute(statistics_key(loaded, targets, calibration), kinds, compute)


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


def time_plain_forward(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
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


def statistics_cached(loaded: LoadedModel, targets: list[TargetLinear], calibration: Calibration,
                       kinds: frozenset[str], cache_dir: Path, layerwise: LayerwiseOptions) -> bool:
    cache = StatisticsCache(cache_dir)
    if not layerwise.enabled:
        return cache.has(statistics_key(loaded, targets, calibration), kinds)
    base = {"model": loaded.identity, "calibration": calibration.describe()}
    blocks = sorted({t.block for t in targets})
    return all(cache.has(block_statistics_key(base, i, [t for t in targets if t.block == i]), kinds)
               for i in blocks)


def _allocate(job: CompressionJob, spectra: dict[str, torch.Tensor], cosine: dict[str, InputStatistics],
              scorer: PlanScorer | None) -> dict[str, int]:
    allocator, budget, matrices = job.allocator, job.budget, job.matrices
    if allocator.spectrum_source is not None:
        matrices = [replace(m, spectrum=spectra[m.name]) for m in matrices]
    plan = allocator.allocate(matrices, budget, AllocationContext(sublayer_cosine=sublayer_cosine(cosine),
                                                                  score=scorer))
    check_plan(plan, budget)
    if allocator.report:
        job.diagnostics["allocation"] = allocator.report
        log.info("allocation: %s", ", ".join(f"{k} = {v}" for k, v in allocator.report.items()
                                              if not isinstance(v, dict)))
    return dict(plan)


def compress(job: CompressionJob) -> Compression:
    """Whole-model or layer-wise, as ``job.layerwise`` says."""
    return (compress_layerwise if job.layerwise.enabled else compress_whole_model)(job)


def compress_whole_model(job: CompressionJob) -> Compression:
    """Statistics of every block in one forward pass, every matrix decomposed, allocate, factorize."""
    model, targets, allocator, watch = job.loaded.model, job.targets, job.allocator, job.watch
    by_name = {t.name: t for t in targets}
    stats: dict[str, InputStatistics] = {}
    if job.kinds:
        with watch("calibration_s"):
            stats, cached = calibration_statistics(job.loaded, targets, job.calibration, job.windows, job.kinds,
                                                   job.cache)
        job.diagnostics["statistics_cached"] = sorted(cached)
        job.diagnostics["statistics_computed"] = sorted(job.kinds - cached)

    def decompose(name: str) -> Decomposition:
        return job.factorizer.decompose(model.get_submodule(name).weight, for_target(stats, by_name[name]))

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
        scorer = _scorer(job, decompositions)
        plan = _allocate(job, spectra, stats, scorer)
    with watch("factorization_s"):
        errors, damping = apply_plan(model, targets, plan, decompose, decompositions)
    decompositions.clear()
    return Compression(plan, errors, damping, scorer)


def compress_layerwise(job: CompressionJob) -> Compression:
    """One block at a time on ``job.device``. An allocator that needs no calibration data gets
    its plan first and every block is factorized in one streaming pass; otherwise a first pass
    gathers spectra and sublayer statistics, the plan is made, and a second pass factorizes."""
    model, allocator, layerwise = job.loaded.model, job.allocator, job.layerwise
    base = {"model": job.loaded.identity, "calibration": job.calibration.describe()}
    compressor = LayerwiseCompressor(model, job.targets, job.windows, job.calibration.batch_size, job.kinds,
                                     job.device, job.cache, base, job.factorizer.decompose,
                                     job.factorizer.describe(), layerwise, job.watch, job.home)
    validation = allocator.validation
    decompositions: dict[str, Decomposition] = {}
    if allocator.spectrum_source is not None or validation is not None or allocator.needs:  # plan needs data
        keeper = DecompositionKeeper(keep_all=validation is not None)
        keep = (lambda name, dec: False) if layerwise.compressed_inputs and validation is None else keeper
        spectra_from = "factorizer" if validation is not None else allocator.spectrum_source
        compressor.run(None, keep=keep, decompositions=decompositions, spectra=spectra_from)
    result = compressor.result
    with job.watch("allocation_s"), on_device(model, job.device, validation is not None):
        scorer = _scorer(job, decompositions)  # scoring runs the whole model on the device
        plan = _allocate(job, result.spectra, result.cosine, scorer)
    if layerwise.compressed_inputs:
        decompositions.clear()  # the statistics of the compressed model differ
    compressor.run(plan, decompositions=decompositions)
    decompositions.clear()
    job.diagnostics["statistics_cached"] = sorted(result.statistics_cached - result.statistics_computed)
    job.diagnostics["statistics_computed"] = sorted(result.statistics_computed)
    job.diagnostics["calibration_passes"] = result.forward_passes
    return Compression(plan, result.errors, result.damping, scorer)


def _scorer(job: CompressionJob, decompositions: dict[str, Decomposition]) -> PlanScorer | None:
    validation = job.allocator.validation
    if validation is None:
        return None
    identity = {"model": job.loaded.identity, "calibration": job.calibration.describe(),
                "factorizer": job.factorizer.describe(), "compressed_inputs": job.layerwise.compressed_inputs,
                "protocol": 2}
    memo = ScoreMemo(job.cache.root.parent / "scores" / ScoreMemo.key(identity, job.held_out))
    return PlanScorer(job.loaded.model, job.targets, decompositions, job.held_out, job.budget, validation,
                      job.tracker, memo)


def decompose_all(targets: list[TargetLinear], decompose: Callable[[str], Decomposition],
                  decompositions: dict[str, Decomposition], keep_all: bool) -> dict[str, torch.Tensor]:
    """Decompose every target once; return the spectra.

    Decompositions are kept in ``decompositions`` for the factorization step up to
    KEEP_DECOMPOSITIONS_BYTES (the rest is decomposed again there), or all of them when ``keep_all``
    (an allocator that scores plans needs every one); kept ones live on the CPU, so a GPU
    holds one decomposition at a time.
    """
    spectra = {}
    keep = DecompositionKeeper(keep_all)
    for t in tqdm(targets, desc="decompose", leave=False, disable=None):
        dec = decompose(t.name)
        spectra[t.name] = dec.spectrum.detach().cpu()
        if keep(t.name, dec):
            decompositions[t.name] = dec.to("cpu")
    if len(decompositions) < len(targets):
        log.info("kept %d of %d decompositions (%.1f GiB); the rest are recomputed when factorizing",
                 len(decompositions), len(targets), keep.held / 2**30)
    return spectra


