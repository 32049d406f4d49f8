"""Energy allocation: every matrix keeps the same fraction t of its spectral energy.

r_a = min{r : E_a(r) >= t} with E_a(r) = sum_{i<=r} s_i^2 / sum_i s_i^2; t is the largest
threshold whose plan fits the budget (an exact search over the values the curves take),
then leftover parameters go one rank step at a time to the matrix keeping the least energy.
"""

from __future__ import annotations

from collections.abc import Sequence

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo, RankPlan, check_spectrum_source
from lrc.allocators.fitting import energy_curve, energy_priority, fit_energy_threshold, meet_budget
from lrc.budget import Budget
from lrc.errors import ConfigError


def energy_plan(matrices: Sequence[MatrixInfo], budget: Budget) -> tuple[RankPlan, float]:
    """Equal energy retention over ``matrices`` meeting ``budget`` exactly; returns (plan, threshold)."""
    missing = [m.name for m in matrices if m.spectrum is None]
    if missing:
        raise ConfigError(f"energy allocation needs the spectrum of every matrix; none for {missing[:3]}")
    curves = {m.name: energy_curve(m.spectrum) for m in matrices}
    plan, threshold = fit_energy_threshold(curves, budget.shapes, budget.params_allowed)
    return meet_budget(plan, budget, energy_priority(curves, budget.shapes)), threshold


class Energy(Allocator):
    """``spectrum``: ``factorizer`` (what the factorizer truncates, e.g. whitened) or ``weight``."""

    def __init__(self, spectrum: str = "factorizer") -> None:
        self.spectrum_source = check_spectrum_source(spectrum)

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        plan, threshold = energy_plan(matrices, budget)
        self.report = {"energy_threshold": threshold}
        return plan
