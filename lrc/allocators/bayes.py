"""Bayesian rank search (Bolaco, arXiv 2405.10616).

The search space is one removal ratio per group of matrices: by default one per projection
type, with q and k sharing one (Bolaco's grouping), optionally split into ``depth_groups``
contiguous ranges of decoder blocks. The objective is scored on held-out validation text
(see :class:`~lrc.allocators.base.Validation`). The optimiser is optuna's: ``sampler: gp``
(Gaussian process, Matern-5/2 kernel with one length scale per dimension, log expected
improvement) or ``tpe``.

Two ways to meet the parameter budget (``budget``):

* ``project`` (lrc's): every candidate is projected onto the budget, one common shift of the
  group ratios clipped to [min_ratio, max_ratio] so that sum_g w_g r_g = R sum_g w_g (w_g: the
  group's parameters), and its ranks are fitted to the budget exactly. The first trial is the
  uniform plan (``warm_start``), so the search never returns something worse on validation
  than uniform allocation.
* ``window`` (Bolaco's released main_bbo.py): the raw candidate is kept only when the
  fraction of the WHOLE target set it removes lies in [R, R + window] (``sample_condition``,
  main_bbo.py L68-88; v_proj kept dense still counts in the whole); other candidates are
  rejected unscored (the sampler learns the feasible region through optuna's constraint
  model; a rejected candidate is told the worst objective seen so far). A matrix at removal
  r gets rank floor_q(ceil((1 - r) m n / (m + n))), q = ``rank_multiple`` (prune_bbo.py
  L198-200: q = 8), r <= 0 dense. The search starts at ``start`` (main_bbo.py L93/L101:
  removal 0.5 for q+k and o, R for the MLP) and then ``startup_trials`` random feasible
  candidates (OpenBox's initial_runs=3 in all). The plan of the best trial removes up to R +
  window; lrc then fits that plan to the budget exactly (rank steps added, one at a time,
  where a matrix is furthest below its group's kept fraction) and scores the final plan too,
  so every method is compared at the same size. The report keeps the best trial's removal of
  the whole target set (continuous ratios and realised ranks) next to the final plan's.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lrc.allocators.base import (
    AllocationContext,
    Allocator,
    MatrixInfo,
    RankPlan,
    Validation,
    blocks_of,
    check_ratio_bounds,
    check_ratio_within,
)
from lrc.allocators.fitting import canonical_rank, meet_budget, plan_from_ratios, project_ratios, ratio_priority
from lrc.budget import Budget
from lrc.errors import ConfigError, LrcError

log = logging.getLogger(__name__)

SAMPLERS = ("gp", "tpe")
BUDGETS = ("project", "window")
DEFAULT_GROUPS = (("q_proj", "k_proj"), ("v_proj",), ("o_proj",), ("gate_proj",), ("up_proj",), ("down_proj",))
MAX_REJECTIONS_PER_TRIAL = 200
STUDY_NAME = "bayes"
STUDY_FILE = "bayes_study.journal"  # optuna JournalStorage, in the run folder
TOLERANCE = 1e-9  # a candidate on the window's edge (the uniform plan) is inside


def group_label(kinds: Sequence[str]) -> str:
    return "+".join(k.removesuffix("_proj") for k in kinds)


def window_rank(shape: tuple[int, int], ratio: float, multiple: int) -> int:
    """Bolaco's rank at removal ``ratio``: ceil((1 - ratio) m n / (m + n)) rounded down to a
    multiple of ``multiple`` (at least 1); ratio <= 0 keeps the matrix dense."""
    if ratio <= 0.0:
        return min(shape)
    m, n = shape
    rank = math.ceil((1.0 - ratio) * m * n / (m + n)) // multiple * multiple
    return canonical_rank(shape, max(rank, 1))


class Bayes(Allocator):
    def __init__(self, n_trials: int = 50, groups: Sequence[Sequence[str]] = DEFAULT_GROUPS,
                 depth_groups: int = 1, sampler: str = "gp", min_ratio: float = 0.0, max_ratio: float = 0.9,
                 startup_trials: int = 10, warm_start: bool = True, seed: int = 0,
                 validation: Mapping[str, Any] | Validation | None = None, budget: str = "project",
                 window: float = 0.1, start: Mapping[str, float] | None = None, rank_multiple: int = 1) -> None:
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            raise ConfigError(f"n_trials={n_trials!r} must be an integer >= 1")
        if not isinstance(depth_groups, int) or depth_groups < 1:
            raise ConfigError(f"depth_groups={depth_groups!r} must be an integer >= 1")
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler={sampler!r} is not one of {SAMPLERS}")
        if budget not in BUDGETS:
            raise ConfigError(f"budget={budget!r} is not one of {BUDGETS}")
        min_ratio, max_ratio = check_ratio_bounds(min_ratio, max_ratio, below_zero=True)
        if not isinstance(window, (int, float)) or not 0 < window < 1:
            raise ConfigError(f"window={window!r} must be a number in (0, 1)")
        if not isinstance(rank_multiple, int) or rank_multiple < 1:
            raise ConfigError(f"rank_multiple={rank_multiple!r} must be a positive integer")
        groups = tuple(tuple(g) for g in groups)
        flat = [k for g in groups for k in g]
        if not groups or any(not g for g in groups):
            raise ConfigError(f"groups={groups!r}: need at least one non-empty group of projection names")
        if len(flat) != len(set(flat)):
            raise ConfigError(f"groups={groups!r} names a projection twice")
        self.n_trials, self.groups, self.depth_groups, self.sampler = n_trials, groups, depth_groups, sampler
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        self.startup_trials, self.warm_start, self.seed = int(startup_trials), bool(warm_start), int(seed)
        self.budget, self.window, self.rank_multiple = budget, float(window), rank_multiple
        self.start = dict(start) if start else None
        self.validation = Validation.build(validation)

    def check(self, matrices: Sequence[MatrixInfo], budget: Budget) -> None:
        kinds = {m.kind for m in matrices}
        named = {k for g in self.groups for k in g}
        unknown = sorted(named - kinds)
        if unknown:
            raise ConfigError(f"bayes: unknown group name(s) {unknown}; this model's projections are "
                              f"{sorted(kinds)}")
        uncovered = sorted(kinds - named)
        if uncovered:
            raise ConfigError(f"bayes: projections {uncovered} are in no group; add them to `groups`")
        blocks = blocks_of(matrices)
        if self.depth_groups > len(blocks):
            raise ConfigError(f"bayes: depth_groups={self.depth_groups} exceeds the {len(blocks)} decoder blocks")
        check_ratio_within("bayes", budget.ratio, self.min_ratio, self.max_ratio)
        if self.start is not None:
            dims = set(self.group_of(matrices).values())
            if set(self.start) != dims:
                raise ConfigError(f"bayes: start={self.start} must give a ratio for each of {sorted(dims)}")

    def group_of(self, matrices: Sequence[MatrixInfo]) -> dict[str, str]:
        """Search-space dimension of every matrix, e.g. ``q+k`` or ``q+k@d1``."""
        kind_group = {k: group_label(g) for g in self.groups for k in g}
        blocks = blocks_of(matrices)
        depth = {b: i * self.depth_groups // len(blocks) for i, b in enumerate(blocks)}
        suffix = (lambda b: f"@d{depth[b]}") if self.depth_groups > 1 else (lambda b: "")
        return {m.name: kind_group[m.kind] + suffix(m.block) for m in matrices}

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        self.check(matrices, budget)
        if context is None or context.score is None:
            raise LrcError("bayes needs a validation scorer (the pipeline builds one from `validation`)")
        search = _Search(self, matrices, budget, context)
        return search.run()


class _Search:
    """One run of the search: the study, the trials scored, the best so far."""

    def __init__(self, owner: Bayes, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext) -> None:
        self.owner, self.matrices, self.budget, self.score = owner, matrices, budget, context.score
        self.state_dir = context.state_dir
        self.group = owner.group_of(matrices)
        self.dims = list(dict.fromkeys(self.group.values()))  # search-space dimensions, in model order
        self.weights = {d: 0 for d in self.dims}
        for m in matrices:
            self.weights[self.group[m.name]] += m.shape[0] * m.shape[1]
        self.need = budget.params_before - budget.params_allowed  # parameters to remove
        self.best: tuple[float, int, RankPlan, dict[str, float]] | None = None
        self.worst = -math.inf

    def violation(self, ratios: Mapping[str, float]) -> float:
        """How far a candidate's removal lies outside [R, R + window], in whole-target fractions (<= 0: inside)."""
        removed = sum(self.weights[d] * ratios[d] for d in self.dims)
        upper = self.need + self.owner.window * self.budget.params_whole
        return max(self.need - removed, removed - upper) / self.budget.params_whole

    def study(self) -> Any:
        import optuna

        owner = self.owner
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        first = owner.start or (dict.fromkeys(self.dims, self.budget.ratio) if owner.warm_start else None)
        queued = [first] if first else []
        if owner.budget == "window":
            rng = random.Random(owner.seed)
            queued += [self.random_feasible(rng) for _ in range(owner.startup_trials)]
        startup = len(queued) if owner.budget == "window" else owner.startup_trials + len(queued)
        with warnings.catch_warnings():  # deterministic_objective is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if owner.sampler == "gp":
                sampler = optuna.samplers.GPSampler(seed=owner.seed, n_startup_trials=startup,
                                                    deterministic_objective=True)
            else:
                sampler = optuna.samplers.TPESampler(seed=owner.seed, n_startup_trials=startup)
        study = optuna.create_study(direction="minimize", sampler=sampler, study_name=STUDY_NAME,
                                    storage=self.storage())
        for params in queued:
            study.enqueue_trial(params)
        return study

    def storage(self) -> Any:
        """The study's optuna storage: a journal file in the run folder, started afresh by each
        attempt (a resumed search replays its scored plans from the score memo, so the journal
        ends holding exactly the uninterrupted search); in memory without a run folder."""
        if self.state_dir is None:
            return None
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(self.state_dir) / STUDY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(path)))
        if any(s.study_name == STUDY_NAME for s in storage.get_all_studies()):
            optuna.delete_study(study_name=STUDY_NAME, storage=storage)
        return storage

    def random_feasible(self, rng: random.Random) -> dict[str, float]:
        for _ in range(MAX_REJECTIONS_PER_TRIAL * 10):
            ratios = {d: rng.uniform(self.owner.min_ratio, self.owner.max_ratio) for d in self.dims}
            if self.violation(ratios) <= TOLERANCE:
                return ratios
        raise ConfigError(f"bayes: no random candidate in [{self.owner.min_ratio}, {self.owner.max_ratio}] removes "
                          f"between ratio={self.budget.ratio:.4g} and ratio + window={self.owner.window}")

    def candidate(self, raw: Mapping[str, float]) -> tuple[RankPlan, dict[str, float]]:
        """The plan a raw candidate stands for, and the group ratios it was made from."""
        owner, matrices, budget = self.owner, self.matrices, self.budget
        if owner.budget == "window":
            plan = {m.name: window_rank(m.shape, raw[self.group[m.name]], owner.rank_multiple) for m in matrices}
            return plan, dict(raw)
        fitted = dict(zip(self.dims, project_ratios([self.weights[d] for d in self.dims], [raw[d] for d in self.dims],
                                                    budget.ratio, owner.min_ratio, owner.max_ratio), strict=True))
        return plan_from_ratios(matrices, budget, {m.name: fitted[self.group[m.name]] for m in matrices}), fitted

    def run(self) -> RankPlan:
        import optuna

        owner = self.owner
        study, scored, rejected = self.study(), 0, 0
        while scored < owner.n_trials:
            trial = study.ask()
            raw = {d: trial.suggest_float(d, owner.min_ratio, owner.max_ratio) for d in self.dims}
            if owner.budget == "window":
                violation = self.violation(raw)
                trial.set_constraint("budget_window", violation - TOLERANCE)  # <= 0: feasible
                if violation > TOLERANCE:
                    rejected += 1
                    if rejected > MAX_REJECTIONS_PER_TRIAL * owner.n_trials:
                        raise LrcError(f"bayes: {rejected} candidates rejected by the budget window; "
                                       f"widen `window` or the box [min_ratio, max_ratio]")
                    if math.isfinite(self.worst):
                        study.tell(trial, self.worst)
                    else:  # nothing scored yet: nothing to impute
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
            plan, ratios = self.candidate(raw)
            score = self.score(plan, trial=scored, **{f"ratio/{d}": ratios[d] for d in self.dims})
            study.tell(trial, score.objective)
            self.worst = max(self.worst, score.objective)
            log.info("bayes trial %d/%d: objective %.4g (ppl %.4g, kl %.4g)", scored + 1, owner.n_trials,
                     score.objective, score.ppl, score.kl)
            if self.best is None or score.objective < self.best[0]:
                self.best = (score.objective, scored, plan, ratios)
            scored += 1
        return self.finish(rejected)

    def finish(self, rejected: int) -> RankPlan:
        objective, number, plan, ratios = self.best
        report = {"best_objective": objective, "best_trial": number, "best_ratios": ratios,
                  "n_trials": self.owner.n_trials, "budget": self.owner.budget}
        if self.owner.budget == "window":
            whole, budget = self.budget.params_whole, self.budget
            continuous = sum(self.weights[d] * ratios[d] for d in self.dims) / whole
            report.update(rejected=rejected, best_trial_removed_continuous=continuous,
                          best_trial_removed=(budget.params_before - budget.params_after(plan)) / whole)
            targets = {m.name: ratios[self.group[m.name]] for m in self.matrices}
            plan = meet_budget(plan, budget, ratio_priority(budget.shapes, targets))  # the best plan, made exact
            final = self.score(plan, trial=self.owner.n_trials, final=1, **{f"ratio/{d}": ratios[d] for d in self.dims})
            report.update(final_objective=final.objective, final_ppl=final.ppl)
        self.owner.report = report
        return plan
