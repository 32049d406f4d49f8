"""Layer-wise mode: one decoder block per visit, on the work device.

The block is put on the device, its statistics are collected from the calibration
activations at its input (:mod:`lrc.compress.stream`), its outputs become the next block's
inputs, and it goes back to where it lives (:mod:`lrc.model.blocks`). Only one block, its
statistics and the activations are ever on the device. With ``compressed_inputs`` a block
sees the outputs of the already compressed blocks before it (statistics of the compressed
model, as in sequential SVD-LLM); otherwise the dense outputs, which gives exactly the
statistics, plan and model of whole-model mode. Statistics are cached per block, so a second
pass reads them back instead of holding every block's statistics. ``sequential_update``
re-fits each factorized pair on the inputs it meets in the compressed model
(:mod:`lrc.compress.correction`), whichever statistics the factorizer used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrc.budget import is_low_rank
from lrc.compress.correction import correct_block, dense_copies, paired_pass
from lrc.compress.stream import BlockStream, layerwise_forward
from lrc.compress.visits import StatisticsSource, Visit, VisitCounter
from lrc.errors import ConfigError
from lrc.model.adapters import TargetLinear, decoder_blocks
from lrc.model.blocks import ResidentBlocks, StreamedBlocks
from lrc.resources import Stopwatch
from lrc.stats.cache import statistics_key
from lrc.stats.hooks import StatisticsHooks
from lrc.stats.kinds import FISHER, parse_kind
from lrc.stats.types import InputStatistics


UPDATE_TARGETS = ("local", "dense")


@dataclass(frozen=True)
class LayerwiseOptions:
    """``layerwise`` in the run config."""

    enabled: bool = False
    compressed_inputs: bool = False  # statistics of each block from the outputs of the compressed blocks before it
    sequential_update: bool = False  # re-fit each factorized pair on its compressed inputs (correction.py)
    update_target: str = "local"  # local: the dense layer on those inputs (SVD-LLM) | dense: the dense model

    def __post_init__(self) -> None:
        for key in ("enabled", "compressed_inputs", "sequential_update"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"layerwise.{key}={getattr(self, key)!r} must be true or false")
        if self.update_target not in UPDATE_TARGETS:
            raise ConfigError(f"layerwise.update_target={self.update_target!r} is not one of {UPDATE_TARGETS}")

    @property
    def sequential(self) -> bool:
        """Whether blocks are visited one at a time (layer-wise mode, or a sequential method in
        whole-model mode, where the blocks are already on the device)."""
        return self.enabled or self.compressed_inputs or self.sequential_update


def check_layerwise(kinds: frozenset[str]) -> None:
    """Layer-wise mode runs forward passes only; reject kinds that need the whole model."""
    if any(parse_kind(k)[0] == FISHER for k in kinds):
        raise ConfigError("the fisher statistic (factorizer=fwsvd) needs a backward pass through the whole "
                          "model, but layerwise.enabled, compressed_inputs or sequential_update visits one block "
                          "at a time: set them to false")


def plan_digest(plan: Mapping[str, int]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(plan.items()))).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Placement:
    """Where layer-wise mode works: the device, where blocks live between visits, the
    ``layerwise`` options (what each block is fed, the sequential update) and the factorizer
    identity the compressed feed depends on."""

    device: torch.device
    home: ResidentBlocks | StreamedBlocks
    options: LayerwiseOptions
    factorizer: dict[str, Any]


class Layerwise:
    """One decoder block per visit, on ``placement.device`` (see the module docstring)."""

    mode = "layerwise"

    def __init__(self, model: nn.Module, targets: list[TargetLinear], source: StatisticsSource,
                 placement: Placement, watch: Stopwatch) -> None:
        self.model, self.source, self.placement, self.watch = model, source, placement, watch
        self.counter = VisitCounter()
        self.corrections: dict[str, tuple[float, float]] = {}  # sequential update: output error before, after
        self._moved_before = placement.home.seconds
        self.path, self.blocks = decoder_blocks(model)
        self.by_block: dict[int, list[TargetLinear]] = {}
        for t in targets:
            self.by_block.setdefault(t.block, []).append(t)

    def _key(self, index: int, plan: Mapping[str, int] | None) -> dict[str, Any]:
        inputs: Any = "dense"
        if plan is not None:  # statistics of the compressed model depend on everything before
            inputs = {"factorizer": self.placement.factorizer, "plan": plan_digest(plan)}
            if self.placement.options.sequential_update:  # ... and on the corrections of the blocks before
                inputs["sequential_update"] = self.placement.options.update_target
        return statistics_key(self.source.base, self.by_block.get(index, []), mode=self.mode, block=index,
                              inputs=inputs)

    def _needed(self, index: int, plan: Mapping[str, int] | None) -> bool:
        """Before the plan is known every block's statistics are; after it, only those of blocks
        with a matrix to factorize (ResSVD's partial-layer plans keep the first blocks dense)."""
        return plan is None or any(is_low_rank(t.shape, plan[t.name]) for t in self.by_block.get(index, []))

    @property
    def refreshes_statistics(self) -> bool:
        """Whether the factorizing pass sees other statistics than the survey (compressed inputs)."""
        return self.placement.options.compressed_inputs

    @property
    def moved_seconds(self) -> float:
        """Seconds this visitor spent moving blocks (the home may serve several runs)."""
        return self.placement.home.seconds - self._moved_before

    def timings(self) -> dict[str, float]:
        return {"block_transfer_s": self.moved_seconds}

    def _keyed(self, plan: Mapping[str, int] | None) -> Mapping[str, int] | None:
        """The plan the statistics depend on: with compressed inputs, the plan; else none (dense)."""
        return plan if plan is not None and self.placement.options.compressed_inputs else None

    def statistics_cached(self, plan: Mapping[str, int] | None = None) -> bool:
        """Whether every block the pass for ``plan`` needs has its statistics cached."""
        keyed = self._keyed(plan)
        return all(self.source.cache.has(self._key(i, keyed), self.source.kinds)
                   for i in range(len(self.blocks)) if self._needed(i, plan))

    def visits(self, plan: Mapping[str, int] | None) -> Iterator[Visit]:
        keyed = self._keyed(plan)
        correcting = plan is not None and self.placement.options.sequential_update
        feeding = keyed is not None or correcting  # the stream carries the compressed model's activations
        # with dense statistics the update still needs them, from a dense stream unless cached
        dense_stats = correcting and keyed is None
        needs_dense = correcting and (self.placement.options.update_target == "dense" or (
            dense_stats and bool(self.source.kinds) and not self.statistics_cached(plan)))
        with self.watch("calibration_s"):
            stream = self._stream(plan, force=correcting)
            dense = self._fresh_stream() if needs_dense else None  # the dense model's activations
        device, home = self.placement.device, self.placement.home
        for index in tqdm(range(len(self.blocks)), desc="layer-wise", leave=False, disable=None):
            with home.visit(index, self.blocks[index], device):
                targets = self.by_block.get(index, [])
                with self.watch("calibration_s"):
                    if dense_stats:  # the dense stream advances here unless the update takes its targets
                        stats = self._block_statistics(index, dense, None, needed=self._needed(index, plan),
                                                       advance=self.placement.options.update_target != "dense")
                    else:
                        stats = self._block_statistics(index, stream, keyed, needed=self._needed(index, plan))
                    if correcting:
                        targets_from = dense if self.placement.options.update_target == "dense" else None
                        moments = paired_pass(self.model, index, stream, targets, targets_from)
                        originals = dense_copies(self.model, targets)
                yield Visit(targets, stats, self._key(index, keyed))
                if correcting:
                    with self.watch("sequential_update_s"):
                        self.corrections.update(correct_block(self.model, targets, originals, moments))
                    del moments, originals
                if feeding and stream is not None:
                    with self.watch("calibration_s"):
                        stream.run(index, advance=True)  # the compressed block's outputs

    def _stream(self, plan: Mapping[str, int] | None, force: bool = False) -> BlockStream | None:
        """A fresh stream of calibration activations for the pass of ``plan``, or None when every
        needed statistic is cached (then no block's outputs are needed) unless ``force``."""
        if not force and (not self.source.kinds or self.statistics_cached(plan)):
            return None
        return self._fresh_stream()

    def _fresh_stream(self) -> BlockStream:
        """A stream of calibration activations from the first block: one more calibration pass."""
        self.counter.passes += 1
        return BlockStream(self.model, self.source.windows, self.source.batch_size, self.placement.device)

    def _block_statistics(self, index: int, stream: BlockStream | None, plan: Mapping[str, int] | None,
                          needed: bool, advance: bool | None = None) -> dict[str, InputStatistics]:
        """Statistics of block ``index`` (cached or computed); runs the block when ``stream`` is
        given, advancing it unless the block is to be compressed before its outputs are taken
        (``plan``: statistics of the compressed model) or ``advance`` says otherwise."""
        advance = plan is None if advance is None else advance
        ran, source = False, self.source

        def compute(missing: frozenset[str]) -> dict[str, InputStatistics]:
            nonlocal ran
            if stream is None:
                raise RuntimeError("statistics missing from the cache with no stream to compute them")
            hooks = StatisticsHooks(self.model, self.by_block.get(index, []), missing, source.windows.numel(),
                                    self.placement.device, blocks=[index])
            stream.run(index, hooks, advance=advance)
            ran = True
            return hooks.finish()

        stats: dict[str, InputStatistics] = {}
        if source.kinds and needed:
            stats, cached = source.cache.get_or_compute(self._key(index, plan), source.kinds, compute, quiet=True)
            self.counter.add(source.kinds, cached)
        if stream is not None and not ran and advance:
            stream.run(index, advance=True)
        return stats

    def plain_forward(self) -> None:
        layerwise_forward(self.model, self.source.windows, self.source.batch_size, self.placement.device,
                          self.placement.home)

    @contextmanager
    def whole_on_device(self) -> Iterator[None]:
        """The whole model on the device for the duration (benchmarks, plan scoring): it lives
        on the host in layer-wise mode (a streamed model is never whole: :func:`check_streamed`)."""
        if self.placement.home.streamed:
            yield
            return
        host = next(self.model.parameters()).device
        self.model.to(self.placement.device)
        try:
            yield
        finally:
            self.model.to(host)

    def report(self) -> dict[str, Any]:
        report = {"mode": self.mode, **self.counter.report()}
        if self.corrections:  # per linear: output error on the calibration tokens before and after its update
            report["sequential_update"] = {name: [before, after] for name, (before, after) in self.corrections.items()}
        return report


def check_streamed(streamed: bool, layerwise: LayerwiseOptions, benchmarks: Sequence[Any], scores: bool) -> None:
    """A model whose blocks are streamed from outside memory is never whole in memory."""
    if not streamed:
        return
    if not layerwise.enabled:
        raise ConfigError("this model streams its decoder blocks from outside memory: set layerwise.enabled=true")
    if benchmarks:
        raise ConfigError("this model streams its decoder blocks from outside memory and cannot be benchmarked "
                          "whole; run without benchmarks (the compressed blocks are in its offload folder)")
    if scores:
        raise ConfigError("a search allocator scores plans on the whole model, which a streamed model never is")
