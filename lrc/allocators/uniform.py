"""Uniform allocation: every matrix loses the same fraction R of its parameters.

r = floor((1 - R) m n / (m + n)), the SVD-LLM protocol. Where factorized matrices add
parameters (feature_pca's bias, ``Budget.extra``), ranks are trimmed one step at a time
(the matrix furthest over its share first) until the plan fits; nothing is topped up.
"""

from __future__ import annotations

from collections.abc import Sequence

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo, RankPlan
from lrc.allocators.fitting import meet_budget, ratio_priority
from lrc.budget import Budget, rank_for_ratio


class Uniform(Allocator):
    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        plan = {m.name: rank_for_ratio(m.shape, budget.ratio) for m in matrices}
        if budget.params_after(plan) <= budget.params_allowed:
            return plan
        targets = dict.fromkeys(plan, budget.ratio)
        return meet_budget(plan, budget, ratio_priority(budget.shapes, targets), top_up=False)
