"""Turning an allocator's intent into a rank plan that meets the budget exactly.

Every allocator ends here: a plan never stores more than the budget allows and is under
it by less than one rank step per matrix (:func:`lrc.budget.check_plan`).

A rank above a matrix's break-even rank stores as much as the dense matrix, so ranks are
kept canonical: either in [1, break-even] (factorized) or min(m, n) (kept dense).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from lrc.allocators.base import MatrixInfo, RankPlan
from lrc.budget import Budget, Shape, break_even_rank, rank_for_ratio, stored_params
from lrc.errors import BudgetError, ConfigError

# priority(name, plan): how much this matrix deserves one more rank step (higher first).
Priority = Callable[[str, Mapping[str, int]], float]


def canonical_rank(shape: Shape, rank: int) -> int:
    """``rank`` clipped to [1, min(m, n)], with any rank above break-even written as dense."""
    full = min(shape)
    rank = max(1, min(int(rank), full))
    return rank if rank <= break_even_rank(shape) else full


def step_up(shape: Shape, rank: int) -> int | None:
    """The next canonical rank (break-even steps to dense), or None when already dense."""
    full = min(shape)
    if rank >= full:
        return None
    return rank + 1 if rank + 1 <= break_even_rank(shape) else full


def step_down(shape: Shape, rank: int) -> int | None:
    """The previous canonical rank (dense steps to break-even), or None at rank 1."""
    if rank <= 1:
        return None
    full = min(shape)
    return min(break_even_rank(shape), full - 1) if rank >= full else rank - 1


def meet_budget(plan: Mapping[str, int], budget: Budget, priority: Priority,
                adjustable: Iterable[str] | None = None, top_up: bool = True) -> RankPlan:
    """Adjust ``plan`` one rank step at a time until it meets ``budget`` exactly.

    Over the budget: step down the adjustable matrix with the LOWEST priority until it fits.
    Then (``top_up``), while a step fits in what is left, step up the one with the HIGHEST
    priority, so the plan ends under the budget by less than the cheapest remaining step.
    """
    plan = {name: canonical_rank(budget.shapes[name], r) for name, r in plan.items()}
    names = list(budget.shapes) if adjustable is None else list(adjustable)
    allowed = budget.params_allowed
    used = budget.params_after(plan)
    while used > allowed:
        options = [n for n in names if step_down(budget.shapes[n], plan[n]) is not None]
        if not options:
            raise BudgetError(f"cannot meet the budget of {allowed} parameters: every adjustable matrix "
                              f"is at rank 1 and the plan still stores {used}")
        name = min(options, key=lambda n: (priority(n, plan), n))
        used += _move(plan, budget, name, step_down(budget.shapes[name], plan[name]))
    if not top_up:
        return plan
    while True:
        options = []
        for n in names:
            nxt = step_up(budget.shapes[n], plan[n])
            if nxt is not None and used + budget.stored(n, nxt) - budget.stored(n, plan[n]) <= allowed:
                options.append(n)
        if not options:
            return plan
        name = max(options, key=lambda n: (priority(n, plan), n))
        used += _move(plan, budget, name, step_up(budget.shapes[name], plan[name]))


def _move(plan: dict[str, int], budget: Budget, name: str, new: int) -> int:
    delta = budget.stored(name, new) - budget.stored(name, plan[name])
    plan[name] = new
    return delta


def ratio_priority(shapes: Mapping[str, Shape], targets: Mapping[str, float]) -> Priority:
    """Priority of matrices given per-matrix removal targets: most under its target kept size first."""
    def priority(name: str, plan: Mapping[str, int]) -> float:
        m, n = shapes[name]
        keep_target = (1.0 - targets[name]) * m * n
        return (keep_target - stored_params((m, n), plan[name])) / (m * n)
    return priority


def plan_from_ratios(matrices: Sequence[MatrixInfo], budget: Budget, ratios: Mapping[str, float],
                     adjustable: Iterable[str] | None = None) -> RankPlan:
    """Each matrix at its own removal ratio (ratio <= 0: dense), then fitted to the budget exactly."""
    plan = {m.name: canonical_rank(m.shape, rank_for_ratio(m.shape, ratios[m.name])) for m in matrices}
    return meet_budget(plan, budget, ratio_priority(budget.shapes, ratios), adjustable)


def project_ratios(weights: Sequence[float], ratios: Sequence[float], target: float,
                   low: float, high: float) -> list[float]:
    """Shift ``ratios`` by one common delta, clipped to [low, high], so that the
    weight-averaged ratio equals ``target`` (sum w_i clip(r_i + d) = target sum w_i)."""
    if not low <= target <= high:
        raise ConfigError(f"ratio={target} is outside [{low}, {high}], the range each group's ratio may take")
    total = float(sum(weights))

    def mean_at(delta: float) -> float:
        return sum(w * min(max(r + delta, low), high) for w, r in zip(weights, ratios, strict=True)) / total

    if all(low <= r <= high for r in ratios) and abs(mean_at(0.0) - target) <= 1e-15:
        return list(ratios)  # already exact: no shift (bisection would leave one of ~1e-17)
    lo, hi = low - max(ratios), high - min(ratios)  # mean_at(lo) = low, mean_at(hi) = high
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    delta = 0.5 * (lo + hi)
    return [min(max(r + delta, low), high) for r in ratios]


def energy_curve(spectrum: torch.Tensor) -> torch.Tensor:
    """E(r) for r = 1..k: fraction of sum(s^2) kept by the top r singular values (float64)."""
    sq = spectrum.detach().double().cpu() ** 2
    total = float(sq.sum())
    if not math.isfinite(total):
        raise ConfigError("a spectrum has non-finite values")
    if total <= 0:
        return torch.ones_like(sq)
    return (torch.cumsum(sq, 0) / total).clamp(max=1.0)


def ranks_at_threshold(curves: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape],
                       threshold: float) -> RankPlan:
    """r_a = min{r : E_a(r) >= threshold}, made canonical."""
    plan = {}
    for name, curve in curves.items():
        r = int(torch.searchsorted(curve, torch.tensor([threshold], dtype=curve.dtype)).item()) + 1
        plan[name] = canonical_rank(shapes[name], min(r, curve.numel()))
    return plan


def fit_energy_threshold(curves: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape],
                         allowed: int) -> tuple[RankPlan, float]:
    """The largest common energy threshold whose plan stores at most ``allowed`` parameters.

    Exact: plans only change at the values the curves take, so the search runs over them.
    Returns (plan, threshold); the plan may be under ``allowed`` by one rank step per
    matrix at most when thresholds tie.
    """
    values = torch.unique(torch.cat(list(curves.values())))  # sorted ascending

    def params(t: float) -> int:
        return sum(stored_params(shapes[n], r) for n, r in ranks_at_threshold(curves, shapes, t).items())

    if params(float(values[0])) > allowed:
        raise BudgetError(f"even rank 1 for every matrix stores {params(float(values[0]))} parameters, "
                          f"more than the {allowed} allowed")
    lo, hi = 0, values.numel() - 1  # params(values[lo]) <= allowed
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if params(float(values[mid])) <= allowed:
            lo = mid
        else:
            hi = mid - 1
    threshold = float(values[lo])
    return ranks_at_threshold(curves, shapes, threshold), threshold


def energy_priority(curves: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape]) -> Priority:
    """Lowest retained energy first (dense counts as all energy kept)."""
    def priority(name: str, plan: Mapping[str, int]) -> float:
        rank = plan[name]
        if rank >= min(shapes[name]):
            return -1.0
        return -float(curves[name][rank - 1])
    return priority
