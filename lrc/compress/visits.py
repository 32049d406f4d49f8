"""The two ways of visiting the decoder blocks with their calibration statistics.

The compression stage (:func:`lrc.compress.stage.compress`) walks the model in visits: each
:class:`Visit` hands it target linears whose weights are at hand, with the statistics they
read. How blocks are visited is the mode:

* :class:`WholeModel` - one visit of every block; the statistics of every block come from one
  forward pass of the whole model (or the cache).
* :class:`lrc.compress.layerwise.Layerwise` - one visit per decoder block, on the work device.

Both read and write the statistics cache, so a sweep computes them once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lrc.data.windows import Calibration
from lrc.model.adapters import TargetLinear
from lrc.model.loading import LoadedModel
from lrc.resources import Stopwatch
from lrc.stats.cache import StatisticsCache, statistics_key
from lrc.stats.collect import collect_statistics, decoder_forward
from lrc.stats.types import InputStatistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Visit:
    """Target linears whose weights are at hand (on the work device), their statistics, and the
    statistics' cache key (what a decomposition computed from them depends on)."""

    targets: list[TargetLinear]
    stats: dict[str, InputStatistics]
    key: dict[str, Any]


@dataclass(frozen=True)
class StatisticsSource:
    """What statistics are computed from: the calibration windows and the statistics kinds,
    and where they are cached under which key (``base``: model identity and calibration)."""

    windows: torch.Tensor
    batch_size: int
    kinds: frozenset[str]
    cache: StatisticsCache
    base: dict[str, Any]

    @classmethod
    def of(cls, loaded: LoadedModel, calibration: Calibration, windows: torch.Tensor, kinds: frozenset[str],
           cache: StatisticsCache) -> StatisticsSource:
        """The statistics of ``calibration`` on ``loaded``, keyed by the model, the calibration set
        and how statistics are stored."""
        base = {"model": loaded.identity, "calibration": calibration.describe(), "storage": cache.storage.tag}
        return cls(windows, calibration.batch_size, kinds, cache, base)


class VisitCounter:
    """Which statistics kinds came from the cache and which were computed, over every visit."""

    def __init__(self) -> None:
        self.cached: set[str] = set()
        self.computed: set[str] = set()
        self.passes = 0  # calibration forward passes

    def add(self, kinds: frozenset[str], cached: frozenset[str]) -> None:
        self.cached |= set(cached)
        self.computed |= set(kinds - cached)

    def report(self) -> dict[str, Any]:
        return {"statistics_cached": sorted(self.cached - self.computed), "statistics_computed": sorted(self.computed),
                "calibration_passes": self.passes}


class WholeModel:
    """Every block in one visit, its statistics from one forward pass (kept for a second visit)."""

    mode = "whole-model"
    refreshes_statistics = False  # a second visit sees the same statistics
    moved_seconds = 0.0  # nothing is moved between visits

    def __init__(self, model: nn.Module, targets: list[TargetLinear], source: StatisticsSource,
                 watch: Stopwatch) -> None:
        self.model, self.targets, self.source, self.watch = model, targets, source, watch
        self.counter = VisitCounter()
        self._stats: dict[str, InputStatistics] | None = None

    def _key(self) -> dict[str, Any]:
        return statistics_key(self.source.base, self.targets, mode=self.mode)

    def statistics_cached(self) -> bool:
        return self.source.cache.has(self._key(), self.source.kinds)

    def visits(self, plan: Mapping[str, int] | None) -> Iterator[Visit]:
        if self._stats is None:
            self._stats = self._statistics()
        yield Visit(self.targets, self._stats, self._key())
        if plan is not None:
            self._stats = None  # factorized: not needed again

    def _statistics(self) -> dict[str, InputStatistics]:
        source = self.source
        if not source.kinds:
            return {}

        def compute(missing: frozenset[str]) -> dict[str, InputStatistics]:
            self.counter.passes += 1
            return collect_statistics(self.model, self.targets, source.windows, missing, source.batch_size)

        with self.watch("calibration_s"):
            stats, cached = source.cache.get_or_compute(self._key(), source.kinds, compute)
        self.counter.add(source.kinds, cached)
        return stats

    def timings(self) -> dict[str, float]:
        return {}

    def plain_forward(self) -> None:
        decoder_forward(self.model, self.source.windows, self.source.batch_size)

    def whole_on_device(self) -> Any:
        return nullcontext()

    def report(self) -> dict[str, Any]:
        return {"mode": self.mode, **self.counter.report()}


class BlockVisitor(Protocol):
    """What the stage needs of a mode (:class:`WholeModel`, :class:`lrc.compress.layerwise.Layerwise`)."""

    mode: str
    source: StatisticsSource
    refreshes_statistics: bool  # whether the factorizing pass sees other statistics than the survey
    moved_seconds: float  # seconds spent moving blocks between the host and the device so far

    def visits(self, plan: Mapping[str, int] | None) -> Iterator[Visit]: ...

    def statistics_cached(self) -> bool: ...

    def plain_forward(self) -> None: ...

    def whole_on_device(self) -> AbstractContextManager[None]: ...

    def report(self) -> dict[str, Any]: ...

    def timings(self) -> dict[str, float]: ...  # seconds the mode spends beyond the stages (moving blocks)


def calibration_statistics(loaded: LoadedModel, targets: list[TargetLinear], calibration: Calibration,
                           windows: torch.Tensor,
                           kinds: frozenset[str], cache: StatisticsCache
                           ) -> tuple[dict[str, InputStatistics], frozenset[str]]:
    """Every block's statistics of ``kinds`` as a whole-model run gets them (same cache entries),
    for notebooks and benchmarks: (statistics, the kinds that came from the cache)."""
    source = StatisticsSource.of(loaded, calibration, windows, kinds, cache)
    visitor = WholeModel(loaded.model, targets, source, Stopwatch())
    stats = next(visitor.visits(None)).stats
    return stats, frozenset(kinds) - frozenset(visitor.counter.computed)


def time_plain_forward(visitor: BlockVisitor, watch: Stopwatch) -> None:
    """Time a plain forward over the calibration set, visiting blocks as the run does: the floor
    the statistics stage is measured against (moving blocks is timed apart, block_transfer_s)."""
    moved = visitor.moved_seconds
    with watch("calibration_forward_s"):
        visitor.plain_forward()
    watch.timings["calibration_forward_s"] -= visitor.moved_seconds - moved
    log.info("a plain %s forward over the %d calibration tokens took %.1fs", visitor.mode,
             visitor.source.windows.numel(), watch.timings["calibration_forward_s"])


