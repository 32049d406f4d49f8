"""The one definition of `ratio` and all rank <-> parameter accounting.

``ratio`` R is the fraction of parameters REMOVED from the target linear layers
(SVD-LLM's definition). A rank-r factorization of an m x n matrix stores r (m + n)
parameters; a rank whose factors would store m n or more is kept dense.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lrc.errors import BudgetError, ConfigError

Shape = tuple[int, int]  # (out_features m, in_features n)


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float if it lies in the open interval (0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio={ratio!r} is not a number; expected a fraction in (0, 1)") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise ConfigError(f"ratio={ratio!r} is outside (0, 1): it is the fraction of target parameters removed")
    return value


def break_even_rank(shape: Shape) -> int:
    """Largest rank whose factors store fewer parameters than the dense matrix (at least 1)."""
    m, n = shape
    return max(1, (m * n - 1) // (m + n))


def stored_params(shape: Shape, rank: int) -> int:
    """Parameters stored for ``shape`` at ``rank`` (dense when factors would not be smaller)."""
    m, n = shape
    return min(rank * (m + n), m * n)


def is_low_rank(shape: Shape, rank: int) -> bool:
    m, n = shape
    return rank * (m + n) < m * n


def max_low_rank(shape: Shape) -> int:
    """The largest rank whose factors are smaller than the dense matrix (at least 1): no plan
    ever factorizes above it, so decompositions need no more columns."""
    m, n = shape
    return max(1, (m * n - 1) // (m + n))


def uniform_rank(shape: Shape, ratio: float) -> int:
    """r = floor((1 - R) m n / (m + n)), the closed form of uniform allocation (at least 1)."""
    m, n = shape
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n)))


def rank_for_ratio(shape: Shape, ratio: float) -> int:
    """Rank removing (at least) fraction ``ratio`` of this matrix; ratio <= 0 keeps it dense."""
    if ratio <= 0.0:
        return min(shape)
    return min(uniform_rank(shape, min(ratio, 1.0)), break_even_rank(shape))


@dataclass(frozen=True)
class Budget:
    """Parameter budget over the target linears for a removal ratio."""

    shapes: Mapping[str, Shape]
    ratio: float
    allowed: int | None = None  # an exact parameter allowance (a part of a larger budget); None: from ratio
    whole: int | None = None  # parameters of the whole target set this budget is a part of; None: itself
    # Parameters a matrix adds once factorized (feature_pca's output-mean bias on a linear without one).
    extra: Mapping[str, int] = field(default_factory=dict)

    @property
    def params_whole(self) -> int:
        return self.whole if self.whole is not None else self.params_before

    @property
    def params_before(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    @property
    def params_allowed(self) -> int:
        """Most parameters the target linears may store after compression."""
        if self.allowed is not None:
            return self.allowed
        return math.floor((1.0 - self.ratio) * self.params_before)

    def without(self, dense: Iterable[str]) -> Budget:
        """The budget left to the other matrices when those named in ``dense`` stay dense.

        Exact in parameters: the others may store ``params_allowed - sum(m n of dense)``, so a
        plan for them plus the dense ones meets this budget exactly; their ``ratio`` is the
        fraction of their own parameters they must lose, R' = 1 - allowed' / P'.
        """
        dense = set(dense)
        rest = {name: shape for name, shape in self.shapes.items() if name not in dense}
        kept = sum(m * n for name, (m, n) in self.shapes.items() if name in dense)
        allowed = self.params_allowed - kept
        floor = sum(self.stored(name, 1) for name in rest)  # every other matrix at rank 1
        if not rest or allowed < floor:
            raise BudgetError(
                f"keeping {len(dense)} matrices dense ({kept} parameters) leaves {allowed} of the "
                f"{self.params_allowed} parameters allowed at ratio={self.ratio:g} to the other "
                f"{len(rest)} matrices, which need at least {floor} (rank 1 each)")
        before = sum(m * n for m, n in rest.values())
        extra = {name: e for name, e in self.extra.items() if name in rest}
        return Budget(rest, 1.0 - allowed / before, allowed, self.params_whole, extra)

    @property
    def slack(self) -> int:
        """How far under the budget a plan may land: one rank step per matrix."""
        return sum(m + n for m, n in self.shapes.values())

    def stored(self, name: str, rank: int) -> int:
        """Parameters matrix ``name`` stores at ``rank``, a factorization's added bias included."""
        shape = self.shapes[name]
        return stored_params(shape, rank) + (self.extra.get(name, 0) if is_low_rank(shape, rank) else 0)

    def params_after(self, plan: Mapping[str, int]) -> int:
        return sum(self.stored(name, plan[name]) for name in self.shapes)

    def removed_fraction(self, plan: Mapping[str, int]) -> float:
        return 1.0 - self.params_after(plan) / self.params_before


def check_plan(plan: Mapping[str, int], budget: Budget) -> None:
    """Raise :class:`BudgetError` unless ``plan`` meets ``budget`` exactly.

    Exactly means: every target has an integer rank in [1, min(m, n)], the plan stores no
    more than the allowed parameters, and it is under them by less than one rank step per
    matrix.
    """
    missing = sorted(set(budget.shapes) - set(plan))
    extra = sorted(set(plan) - set(budget.shapes))
    if missing or extra:
        raise BudgetError(f"rank plan does not match the targets: missing {missing[:3]}, unknown {extra[:3]}")
    for name, rank in plan.items():
        m, n = budget.shapes[name]
        if not isinstance(rank, int) or not 1 <= rank <= min(m, n):
            raise BudgetError(f"rank {rank!r} for {name} is outside [1, {min(m, n)}]")
    after, allowed = budget.params_after(plan), budget.params_allowed
    if after > allowed:
        raise BudgetError(f"rank plan stores {after} parameters, over the budget of {allowed}")
    if allowed - after >= budget.slack:
        raise BudgetError(
            f"rank plan stores {after} parameters, under the budget of {allowed} by more than "
            f"one rank step per matrix ({budget.slack})"
        )
