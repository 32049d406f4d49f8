"""Bayesian rank search (Bolaco, arXiv 2405.10616).

The search space is one removal ratio per group of matrices: by default one per projection
type, with q and k sharing one (Bolaco's grouping), optionally split into ``depth_groups``
contiguous ranges of decoder blocks. The budget is a hard constraint: every candidate is
projected onto it (one common shift of the group ratios, clipped to [min_ratio, max_ratio],
so the parameter-weighted removal equals the target) before it is evaluated. The objective
is the validation perplexity plus the reverse KL to the dense model (see
:class:`~lrc.allocators.base.Validation`), on held-out calibration text.

The optimiser is optuna's: ``sampler: gp`` (Gaussian process, Matern-5/2 kernel, log
expected improvement) or ``tpe``. The first trial is the uniform plan (``warm_start``), so the
search never returns something worse on validation than uniform allocation.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo, RankPlan, Validation, blocks_of
from lrc.allocators.fitting import plan_from_ratios, project_ratios
from lrc.budget import Budget
from lrc.errors import ConfigError, LrcError

log = logging.getLogger(__name__)

SAMPLERS = ("gp", "tpe")
DEFAULT_GROUPS = (("q_proj", "k_proj"), ("v_proj",), ("o_proj",), ("gate_proj",), ("up_proj",), ("down_proj",))


def group_label(kinds: Sequence[str]) -> str:
    return "+".join(k.removesuffix("_proj") for k in kinds)


class Bayes(Allocator):
    def __init__(self, n_trials: int = 50, groups: Sequence[Sequence[str]] = DEFAULT_GROUPS,
                 depth_groups: int = 1, sampler: str = "gp", min_ratio: float = 0.0, max_ratio: float = 0.9,
                 startup_trials: int = 10, warm_start: bool = True, seed: int = 0,
                 validation: Mapping[str, Any] | Validation | None = None) -> None:
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            raise ConfigError(f"n_trials={n_trials!r} must be an integer >= 1")
        if not isinstance(depth_groups, int) or depth_groups < 1:
            raise ConfigError(f"depth_groups={depth_groups!r} must be an integer >= 1")
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler={sampler!r} is not one of {SAMPLERS}")
        if not 0.0 <= min_ratio < max_ratio < 1.0:
            raise ConfigError(f"need 0 <= min_ratio < max_ratio < 1, got min_ratio={min_ratio}, "
                              f"max_ratio={max_ratio}")
        groups = tuple(tuple(g) for g in groups)
        flat = [k for g in groups for k in g]
        if not groups or any(not g for g in groups):
            raise ConfigError(f"groups={groups!r}: need at least one non-empty group of projection names")
        if len(flat) != len(set(flat)):
            raise ConfigError(f"groups={groups!r} names a projection twice")
        self.n_trials, self.groups, self.depth_groups, self.sampler = n_trials, groups, depth_groups, sampler
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)
        self.startup_trials, self.warm_start, self.seed = int(startup_trials), bool(warm_start), int(seed)
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
        if not self.min_ratio <= budget.ratio <= self.max_ratio:
            raise ConfigError(f"bayes: ratio={budget.ratio} is outside [min_ratio={self.min_ratio}, "
                              f"max_ratio={self.max_ratio}]")

    def group_of(self, matrices: Sequence[MatrixInfo]) -> dict[str, str]:
        """Search-space dimension of every matrix, e.g. ``q+k`` or ``q+k@d1``."""
        kind_group = {k: group_label(g) for g in self.groups for k in g}
        blocks = blocks_of(matrices)
        depth = {b: i * self.depth_groups // len(blocks) for i, b in enumerate(blocks)}
        suffix = (lambda b: f"@d{depth[b]}") if self.depth_groups > 1 else (lambda b: "")
        return {m.name: kind_group[m.kind] + suffix(m.block) for m in matrices}

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        import optuna

        self.check(matrices, budget)
        if context is None or context.score is None:
            raise LrcError("bayes needs a validation scorer (the pipeline builds one from `validation`)")
        group = self.group_of(matrices)
        dims = list(dict.fromkeys(group.values()))  # search-space dimensions, in model order
        weights = {d: 0 for d in dims}
        for m in matrices:
            weights[group[m.name]] += m.shape[0] * m.shape[1]

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.sampler == "gp":
            with warnings.catch_warnings():  # deterministic_objective is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                sampler = optuna.samplers.GPSampler(seed=self.seed, n_startup_trials=self.startup_trials,
                                                    deterministic_objective=True)
        else:
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.startup_trials)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        if self.warm_start:
            study.enqueue_trial(dict.fromkeys(dims, budget.ratio))

        best: tuple[float, int, RankPlan, dict[str, float]] | None = None
        for number in range(self.n_trials):
            trial = study.ask()
            raw = [trial.suggest_float(d, self.min_ratio, self.max_ratio) for d in dims]
            fitted = dict(zip(dims, project_ratios([weights[d] for d in dims], raw, budget.ratio,
                                                   self.min_ratio, self.max_ratio), strict=True))
            plan = plan_from_ratios(matrices, budget, {m.name: fitted[group[m.name]] for m in matrices})
            score = context.score(plan, trial=number, **{f"ratio/{d}": fitted[d] for d in dims})
            trial.set_user_attr("projected", fitted)
            study.tell(trial, score.objective)
            log.info("bayes trial %d/%d: objective %.4g (ppl %.4g, kl %.4g)", number + 1, self.n_trials,
                     score.objective, score.ppl, score.kl)
            if best is None or score.objective < best[0]:
                best = (score.objective, number, plan, fitted)
        objective, number, plan, fitted = best
        self.report = {"best_objective": objective, "best_trial": number, "best_ratios": fitted,
                       "n_trials": self.n_trials}
        return plan
