"""Uniform allocation: every matrix loses the same fraction R of its parameters.

r = floor((1 - R) m n / (m + n)), the SVD-LLM protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo, RankPlan
from lrc.budget import Budget, rank_for_ratio


class Uniform(Allocator):
    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        return {m.name: rank_for_ratio(m.shape, budget.ratio) for m in matrices}
