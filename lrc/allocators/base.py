"""The allocator protocol.

An allocator never sees weights: it gets each target matrix's shape, position and
(optionally) the spectrum to allocate energy over, plus the parameter budget and an
:class:`AllocationContext` (sublayer statistics, a validation scorer), and returns a
rank plan ``{module name: rank}``. The pipeline checks every plan with
:func:`lrc.budget.check_plan`.

What an allocator declares, so the pipeline prepares only that:

* ``spectrum_source`` - ``"factorizer"`` (the spectrum the chosen factorizer truncates) or
  ``"weight"`` (the plain weight's singular values) fills ``MatrixInfo.spectrum``; None: none.
* ``needs`` - calibration statistics kinds (e.g. ``"cosine"`` for sublayer similarity).
* ``validation`` - a :class:`Validation`: the pipeline builds a scorer that evaluates a
  candidate plan on held-out calibration text (search-based allocators).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lrc.budget import Budget, Shape
from lrc.errors import ConfigError

RankPlan = dict[str, int]
SPECTRUM_SOURCES = ("factorizer", "weight")


@dataclass(frozen=True)
class MatrixInfo:
    """What an allocator may know about one target matrix."""

    name: str
    shape: Shape
    block: int  # decoder block index
    sublayer: str  # "attn" | "mlp"
    kind: str  # projection type, e.g. "q_proj"
    spectrum: torch.Tensor | None = None  # descending singular values (see Allocator.spectrum_source)


@dataclass(frozen=True)
class Score:
    """A candidate plan evaluated on the validation windows (lower is better)."""

    objective: float  # ppl + kl_weight * kl, or its log (see Validation)
    ppl: float
    kl: float  # reverse KL(compressed || dense), reduced as Validation.kl_reduction says


# score(plan, **trial_info) -> Score; trial_info is logged with the trial (e.g. its group ratios).
ScoreFn = Callable[..., Score]
KL_REDUCTIONS = ("token_mean", "window_sum")
OBJECTIVES = ("ppl", "log")


@dataclass(frozen=True)
class Validation:
    """The held-out validation subset a search-based allocator scores plans on, and the objective.

    Drawn from the calibration config's validation text (or held-out windows of the
    calibration text), never from benchmark text. The objective of a plan is

        J = ppl + kl_weight * KL(compressed || dense)      (``objective: ppl``)
        log J                                              (``objective: log``)

    with the KL summed over the vocabulary at every position of a window, then either
    averaged over all positions (``token_mean``, lrc's default) or summed over a window's
    positions and averaged over windows (``window_sum``: Bolaco's ``kl_div(..., 'batchmean')``
    on one window at a time, lib/evaluator.py). ``log`` is a monotone transform: the same
    scores rank plans the same way, but one catastrophic candidate (J in the thousands) cannot
    dominate the Gaussian process fitted to the objectives.
    """

    nsamples: int = 8
    seqlen: int = 256
    batch_size: int = 4
    kl_weight: float = 1.0
    kl_reduction: str = "token_mean"
    objective: str = "ppl"

    def __post_init__(self) -> None:
        for key in ("nsamples", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"validation.{key}={value!r} must be a positive integer")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ConfigError(f"validation.seqlen={self.seqlen!r} must be an integer >= 2")
        if not isinstance(self.kl_weight, (int, float)) or self.kl_weight < 0:
            raise ConfigError(f"validation.kl_weight={self.kl_weight!r} must be a number >= 0")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"validation.kl_reduction={self.kl_reduction!r} is not one of {KL_REDUCTIONS}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"validation.objective={self.objective!r} is not one of {OBJECTIVES}")

    def score(self, ppl: float, kl_token_mean: float, window_length: int | None = None) -> Score:
        """The Score of a plan from its perplexity and its per-position mean reverse KL
        (``window_length``: positions per window, default ``seqlen``)."""
        positions = window_length if window_length is not None else self.seqlen
        kl = kl_token_mean * positions if self.kl_reduction == "window_sum" else kl_token_mean
        objective = ppl + self.kl_weight * kl
        return Score(objective=math.log(objective) if self.objective == "log" else objective, ppl=ppl, kl=kl)

    @classmethod
    def build(cls, options: Mapping[str, Any] | Validation | None) -> Validation:
        if isinstance(options, Validation):
            return options
        try:
            return cls(**dict(options or {}))
        except TypeError as exc:
            raise ConfigError(f"validation: {exc}") from None


@dataclass
class AllocationContext:
    """What the pipeline hands an allocator besides the matrices and the budget."""

    # (block, sublayer) -> mean cosine similarity of the sublayer's input and output
    # hidden states: (before the residual add, after it).
    sublayer_cosine: Mapping[tuple[int, str], tuple[float, float]] = field(default_factory=dict)
    score: ScoreFn | None = None
    # Where a search may keep a record of itself for this run (the run folder), or None.
    state_dir: Path | None = None


class Allocator(ABC):
    """Splits a :class:`~lrc.budget.Budget` into ranks.

    After :meth:`allocate`, ``report`` holds what the allocator decided beyond the ranks
    (sublayer ratios, the chosen k, the best trial); it goes into ``result.json``.
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    spectrum_source: str | None = None
    validation: Validation | None = None

    def check(self, matrices: Sequence[MatrixInfo], budget: Budget) -> None:  # noqa: B027 - optional hook
        """Raise a ConfigError if this allocator cannot meet ``budget`` on these matrices.

        Called before any heavy work (statistics, factorization); ``spectrum`` is None here.
        """

    @abstractmethod
    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        """Return a rank for every matrix in ``matrices``."""

    def tables(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """Tables of what the allocator measured (name -> (columns, rows)), logged to W&B."""
        return {}

    @property
    def report(self) -> dict[str, Any]:
        return getattr(self, "_report", {})

    @report.setter
    def report(self, value: dict[str, Any]) -> None:
        self._report = value


def check_spectrum_source(value: str | None) -> str | None:
    if value is not None and value not in SPECTRUM_SOURCES:
        raise ConfigError(f"spectrum={value!r} is not one of {SPECTRUM_SOURCES}")
    return value


def blocks_of(matrices: Sequence[MatrixInfo]) -> list[int]:
    return sorted({m.block for m in matrices})


def check_ratio_bounds(min_ratio: float, max_ratio: float, below_zero: bool = False) -> tuple[float, float]:
    """The removal ratios an allocator may give any group: 0 <= min_ratio < max_ratio < 1, or
    -1 < min_ratio with ``below_zero`` (a search whose candidates may keep a group dense)."""
    low_ok = -1.0 < min_ratio if below_zero else 0.0 <= min_ratio
    if not (low_ok and min_ratio < max_ratio < 1.0):
        low = "-1 <" if below_zero else "0 <="
        raise ConfigError(f"need {low} min_ratio < max_ratio < 1, got min_ratio={min_ratio}, max_ratio={max_ratio}")
    return float(min_ratio), float(max_ratio)


def check_ratio_within(who: str, ratio: float, min_ratio: float, max_ratio: float) -> None:
    """A global ratio the allocator's bounds cannot reach is a config error, before any heavy work."""
    if not min_ratio <= ratio <= max_ratio:
        raise ConfigError(f"{who}: ratio={ratio:.4g} is outside [min_ratio={min_ratio}, max_ratio={max_ratio}]")
