"""The compression stage: survey (spectra) -> allocate (rank plan) -> factorize (swap in layers).

One path for both modes: a block visitor (:mod:`lrc.compress.visits`) hands the stage target
linears with their statistics, all at once (whole-model) or one decoder block at a time
(layer-wise). An allocator that needs calibration data gets a survey pass first (every
matrix's spectrum; sublayer statistics); then the plan is made, and a second pass factorizes
every block to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo
from lrc.budget import Budget, check_plan, max_low_rank
from lrc.compress.decompositions import DecompositionCache
from lrc.compress.scoring import PlanScorer, ScoreMemo
from lrc.compress.swap import apply_plan
from lrc.compress.visits import BlockVisitor, Visit
from lrc.factorizers.base import Decomposition, Factorizer
from lrc.model.adapters import TargetLinear
from lrc.resources import Stopwatch
from lrc.stats.collect import for_target
from lrc.stats.hooks import sublayer_cosine

log = logging.getLogger(__name__)
# Most bytes of decompositions held between the survey and factorization when the allocator
# only needs spectra (beyond it, matrices are decomposed a second time instead).
KEEP_DECOMPOSITIONS_BYTES = 8 * 2**30


@dataclass(frozen=True)
class Method:
    """What compresses: an allocator and a factorizer (any pair composes)."""

    factorizer: Factorizer
    allocator: Allocator

    @property
    def kinds(self) -> frozenset[str]:
        """The statistics kinds to collect."""
        return frozenset(self.factorizer.needs | self.allocator.needs)

    @property
    def plan_needs_data(self) -> bool:
        """Whether the plan depends on calibration data (spectra, statistics, validation scores)."""
        allocator = self.allocator
        return allocator.spectrum_source is not None or allocator.validation is not None or bool(allocator.needs)


@dataclass(frozen=True)
class Task:
    """What is compressed: the target linears of ``model``, under ``budget``; the size of each
    target's bias and (parameters, bytes) of the model before compression."""

    model: nn.Module
    targets: list[TargetLinear]
    budget: Budget
    bias: dict[str, int] = field(default_factory=dict)
    size_before: tuple[int, int] = (0, 0)

    def matrices(self) -> list[MatrixInfo]:
        return [MatrixInfo(t.name, t.shape, t.block, t.sublayer, t.kind) for t in self.targets]


@dataclass(frozen=True)
class Scoring:
    """What a search allocator's plan scorer needs besides the model: the held-out validation
    windows and the memo of plans already scored; and where the search may keep a record of
    itself (the run folder; None: nowhere)."""

    windows: torch.Tensor
    memo: ScoreMemo
    state_dir: Path | None = None


@dataclass
class Compression:
    """What the stage did: the rank plan, per-matrix diagnostics, the plans a search scored."""

    plan: dict[str, int]
    diagnostics: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Survey:
    """What a first pass over the blocks gathered for the allocator."""

    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    cosine: dict[str, Any] = field(default_factory=dict)  # sublayer statistics of every block
    decompositions: dict[str, Decomposition] = field(default_factory=dict)  # kept for factorization


class DecompositionKeeper:
    """Whether to keep a decomposition until factorization: all of them for an allocator that
    scores plans, none when ``keep_none``, else up to KEEP_DECOMPOSITIONS_BYTES (the rest is
    decomposed again); kept ones move to the CPU, so a GPU holds one at a time."""

    def __init__(self, keep_all: bool, keep_none: bool = False) -> None:
        self.keep_all, self.keep_none, self.held = keep_all, keep_none, 0

    def __call__(self, dec: Decomposition) -> bool:
        if self.keep_none or (not self.keep_all and self.held + dec.nbytes > KEEP_DECOMPOSITIONS_BYTES):
            return False
        self.held += dec.nbytes
        return True


def compress(task: Task, method: Method, visitor: BlockVisitor, scoring: Scoring | None, watch: Stopwatch,
             stored: DecompositionCache | None = None) -> Compression:
    """Compress ``task.model`` in place; return the plan and what the stage measured
    (``stored``: decompositions read from and written to disk)."""
    decomposer = Decomposer(method.factorizer, stored)
    survey = Survey()
    if method.plan_needs_data:
        # kept decompositions serve factorization, unless the blocks will then see other inputs
        keeper = DecompositionKeeper(keep_all=scoring is not None,
                                     keep_none=visitor.refreshes_statistics and scoring is None)
        survey = survey_blocks(task, method.allocator, decomposer, visitor, keeper, watch)
    scorer = None
    with watch("allocation_s"), visitor.whole_on_device() if scoring is not None else nullcontext():
        if scoring is not None:  # scoring runs the whole model on the device
            scorer = PlanScorer(task.model, task.targets, survey.decompositions, scoring.windows, task.budget,
                                method.allocator.validation, scoring.memo)
        plan = allocate(task, method.allocator, survey, scorer, scoring.state_dir if scoring is not None else None)
    if visitor.refreshes_statistics:
        survey.decompositions.clear()  # the statistics of the compressed model differ
    errors, notes = factorize_blocks(task, decomposer, visitor, plan, survey.decompositions, watch)
    survey.decompositions.clear()
    damping = {name: note["damping"] for name, note in notes.items() if note.get("damping")}
    fallbacks = sorted(name for name, note in notes.items() if note.get("float64_fallback"))
    if damping:
        log.warning("whitening needed damping for %d matrices (max %.3g x mean diag)", len(damping),
                    max(damping.values()))
    watch.timings.update(visitor.timings())
    diagnostics = {**visitor.report(), **(stored.report() if stored is not None else {}),
                   "truncation_error": errors, "damping": damping}
    if method.factorizer.fallback:  # compute_dtype=auto: which matrices needed float64
        diagnostics["float64_fallback"] = fallbacks
        log.info("compute_dtype=auto: %d of %d matrices decomposed again in float64", len(fallbacks), len(notes))
    if method.allocator.report:
        diagnostics["allocation"] = method.allocator.report
    return Compression(plan, diagnostics, scorer.trials if scorer is not None else [])


@dataclass(frozen=True)
class Decomposer:
    """Decomposes the targets of a visit with the factorizer, through the decomposition cache
    when there is one; each only up to the largest rank a plan can factorize it to."""

    factorizer: Factorizer
    stored: DecompositionCache | None = None

    def for_visit(self, task: Task, visit: Visit) -> Callable[[str], Decomposition]:
        """``decompose(name)`` for the targets of one visit."""
        by_name = {t.name: t for t in visit.targets}

        def decompose(name: str) -> Decomposition:
            weight, stats = task.model.get_submodule(name).weight, for_target(visit.stats, by_name[name])
            max_rank = max_low_rank(by_name[name].shape)
            if self.stored is None:
                return self.factorizer.decompose(weight, stats, max_rank)
            return self.stored.get_or_compute(visit.key, self.factorizer.describe(), name,
                                              lambda: self.factorizer.decompose(weight, stats, max_rank))

        return decompose


def survey_blocks(task: Task, allocator: Allocator, decomposer: Decomposer, visitor: BlockVisitor,
                  keep: DecompositionKeeper, watch: Stopwatch) -> Survey:
    """One pass over the blocks: sublayer statistics, and the spectrum every matrix gets in the
    allocator's terms (``spectrum_source``); every matrix is decomposed when the factorizer's
    spectra are asked for or plans are scored (``keep`` says which decompositions stay)."""
    source, survey = allocator.spectrum_source, Survey()
    decompose_all = source == "factorizer" or keep.keep_all
    with closing(visitor.visits(None)) as visits:  # a failure mid-pass returns the visited block at once
        for visit in visits:
            survey.cosine.update({k: v for k, v in visit.stats.items() if k.startswith("sublayer:")})
            if not (decompose_all or source == "weight"):
                continue  # the allocator needs only the sublayer statistics
            decompose = decomposer.for_visit(task, visit)
            with watch("factorization_s" if decompose_all else "allocation_s"):
                for t in visit.targets:
                    if decompose_all:
                        dec = decompose(t.name)
                        if source == "factorizer":
                            survey.spectra[t.name] = dec.spectrum.detach().cpu()
                        if keep(dec):
                            survey.decompositions[t.name] = dec.to("cpu")
                    if source == "weight":
                        weight = task.model.get_submodule(t.name).weight.detach().double()
                        survey.spectra[t.name] = torch.linalg.svdvals(weight).cpu()
    if decompose_all and len(survey.decompositions) < len(task.targets):
        log.info("kept %d of %d decompositions (%.1f GiB); the rest are recomputed when factorizing",
                 len(survey.decompositions), len(task.targets), keep.held / 2**30)
    return survey


def allocate(task: Task, allocator: Allocator, survey: Survey, scorer: PlanScorer | None,
             state_dir: Path | None = None) -> dict[str, int]:
    """The allocator's rank plan, checked against the budget."""
    matrices: Sequence[MatrixInfo] = task.matrices()
    if allocator.spectrum_source is not None:
        matrices = [replace(m, spectrum=survey.spectra[m.name]) for m in matrices]
    context = AllocationContext(sublayer_cosine=sublayer_cosine(survey.cosine), score=scorer, state_dir=state_dir)
    plan = allocator.allocate(matrices, task.budget, context)
    check_plan(plan, task.budget)
    if allocator.report:
        log.info("allocation: %s", ", ".join(f"{k} = {v}" for k, v in allocator.report.items()
                                              if not isinstance(v, dict)))
    return dict(plan)


def factorize_blocks(task: Task, decomposer: Decomposer, visitor: BlockVisitor, plan: Mapping[str, int],
                     decompositions: dict[str, Decomposition], watch: Stopwatch
                     ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Swap every planned matrix for its low-rank layer, block by block as the visitor goes;
    returns per-matrix truncation errors and factorizer diagnostics."""
    errors: dict[str, float] = {}
    notes: dict[str, dict[str, Any]] = {}
    with closing(visitor.visits(plan)) as visits:  # a failure mid-pass returns the visited block at once
        for visit in visits:
            with watch("factorization_s"):
                e, n = apply_plan(task.model, visit.targets, plan, decomposer.for_visit(task, visit), decompositions)
            errors.update(e)
            notes.update(n)
    return errors, notes
