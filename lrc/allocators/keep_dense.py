"""Projections kept dense: any allocator, with the named projection types left out.

Bolaco's released search never compresses ``v_proj``; other methods keep other matrices.
With P the target parameters, R the removal ratio and P_d the parameters kept dense, the
other matrices may store exactly

    allowed' = floor((1 - R) P) - P_d,   i.e. they lose R' = 1 - allowed' / (P - P_d),

so the whole plan meets the global budget exactly (:meth:`lrc.budget.Budget.without`). The
wrapped allocator plans the others under that budget; a scoring callback still sees whole
plans (the dense matrices at full rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo, RankPlan, Score
from lrc.budget import Budget
from lrc.errors import BudgetError, ConfigError


class KeepDense(Allocator):
    """``inner`` allocates every matrix whose projection type is not in ``kinds``."""

    def __init__(self, inner: Allocator, kinds: Sequence[str]) -> None:
        kinds = tuple(kinds)
        if not kinds or any(not isinstance(k, str) or not k for k in kinds):
            raise ConfigError(f"keep_dense={list(kinds)!r} must be a non-empty list of projection names")
        self.inner, self.kinds = inner, kinds
        self.needs = inner.needs
        self.spectrum_source = inner.spectrum_source
        self.validation = inner.validation

    def split(self, matrices: Sequence[MatrixInfo], budget: Budget) -> tuple[list[MatrixInfo], RankPlan, Budget]:
        """(the matrices the inner allocator plans, the dense part of the plan, their budget)."""
        known = {m.kind for m in matrices}
        unknown = sorted(set(self.kinds) - known)
        if unknown:
            raise ConfigError(f"keep_dense: unknown projection(s) {unknown}; this model's projections are "
                              f"{sorted(known)}")
        dense = {m.name: min(m.shape) for m in matrices if m.kind in self.kinds}
        try:
            rest = budget.without(dense)
        except BudgetError as exc:
            raise BudgetError(f"keep_dense={list(self.kinds)}: {exc}") from None
        return [m for m in matrices if m.name not in dense], dense, rest

    def check(self, matrices: Sequence[MatrixInfo], budget: Budget) -> None:
        others, _, rest = self.split(matrices, budget)
        try:
            self.inner.check(others, rest)
        except ConfigError as exc:
            raise ConfigError(f"keep_dense={list(self.kinds)}: to remove ratio={budget.ratio:g} overall, the other "
                              f"projections must lose {rest.ratio:.4f} of their parameters; {exc}") from None

    def tables(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        return self.inner.tables()

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        self.check(matrices, budget)
        others, dense, rest = self.split(matrices, budget)
        inner_context = context
        if context is not None and context.score is not None:
            score = context.score

            def whole_plan_score(plan: RankPlan, **info: Any) -> Score:
                return score({**plan, **dense}, **info)

            inner_context = AllocationContext(sublayer_cosine=context.sublayer_cosine, score=whole_plan_score)
        plan = self.inner.allocate(others, rest, inner_context)
        self.report = {**self.inner.report, "keep_dense": list(self.kinds), "others_ratio": rest.ratio}
        return {m.name: dense.get(m.name, plan.get(m.name)) for m in matrices}
