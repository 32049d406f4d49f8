"""ResSVD partial-layer compression (arXiv 2505.20112).

Under an overall ratio R, only the last k of the N decoder blocks are compressed, each at
ratio N R / k (in general R P / P_k, with P_k the parameters of the last k blocks; the two
agree when blocks are the same size); the first N - k blocks stay dense. This needs
k > N R. ``k: search`` tries every feasible k (or ``candidates``) and keeps the one with the
smallest validation perplexity on held-out calibration text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo, RankPlan, Validation, blocks_of
from lrc.allocators.fitting import plan_from_ratios
from lrc.budget import Budget
from lrc.errors import ConfigError, LrcError

log = logging.getLogger(__name__)
SEARCH = "search"


class ResSVDPLC(Allocator):
    def __init__(self, k: int | str = SEARCH, candidates: Sequence[int] | None = None,
                 validation: Mapping[str, Any] | Validation | None = None) -> None:
        if k != SEARCH and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError(f"k={k!r} must be a positive integer or {SEARCH!r}")
        if candidates is not None and (not candidates or any(not isinstance(c, int) or c < 1 for c in candidates)):
            raise ConfigError(f"candidates={candidates!r} must be a non-empty list of positive integers")
        ignored = sorted(set(dict(validation or {})) & {"kl_weight", "kl_reduction", "objective"})
        if ignored and not isinstance(validation, Validation):
            raise ConfigError(f"ressvd_plc chooses k by validation perplexity alone; validation options {ignored} "
                              "would not be used")
        self.k, self.candidates = k, (sorted(set(candidates)) if candidates else None)
        self.validation = Validation.build(validation) if k == SEARCH else None

    @staticmethod
    def block_ratio(matrices: Sequence[MatrixInfo], budget: Budget, k: int) -> float:
        """Removal ratio of each of the last k blocks so the whole removes budget.ratio."""
        last = set(blocks_of(matrices)[-k:])
        compressed = sum(m.shape[0] * m.shape[1] for m in matrices if m.block in last)
        return budget.ratio * budget.params_before / compressed

    def feasible(self, matrices: Sequence[MatrixInfo], budget: Budget, k: int) -> str | None:
        """None if k can meet the budget, else why not."""
        n = len(blocks_of(matrices))
        if not 1 <= k <= n:
            return f"k={k} is outside [1, N={n}]"
        ratio = self.block_ratio(matrices, budget, k)
        if ratio >= 1.0:
            return (f"k={k} must exceed N*R = {n}*{budget.ratio:g} = {n * budget.ratio:g}: "
                    f"the last {k} blocks would have to lose {ratio:.3g} of their parameters")
        last = set(blocks_of(matrices)[-k:])
        floor = sum(m.shape[0] + m.shape[1] for m in matrices if m.block in last)  # all at rank 1
        kept = budget.params_allowed - sum(m.shape[0] * m.shape[1] for m in matrices if m.block not in last)
        if floor > kept:
            return f"k={k}: even rank 1 in the last {k} blocks stores more than the budget allows"
        return None

    def candidate_ks(self, matrices: Sequence[MatrixInfo], budget: Budget) -> list[int]:
        if self.k != SEARCH:
            return [self.k]
        n = len(blocks_of(matrices))
        return [k for k in (self.candidates or range(1, n + 1)) if self.feasible(matrices, budget, k) is None]

    def check(self, matrices: Sequence[MatrixInfo], budget: Budget) -> None:
        if self.k != SEARCH:
            reason = self.feasible(matrices, budget, self.k)
            if reason:
                raise ConfigError(f"ressvd_plc: {reason}")
        elif not self.candidate_ks(matrices, budget):
            n = len(blocks_of(matrices))
            raise ConfigError(f"ressvd_plc: no candidate k in {self.candidates or f'1..{n}'} can remove "
                              f"ratio={budget.ratio} (need k > N*R = {n * budget.ratio:g})")

    def plan_for(self, matrices: Sequence[MatrixInfo], budget: Budget, k: int) -> RankPlan:
        last = set(blocks_of(matrices)[-k:])
        ratio = self.block_ratio(matrices, budget, k)
        ratios = {m.name: ratio if m.block in last else 0.0 for m in matrices}
        return plan_from_ratios(matrices, budget, ratios, adjustable=[m.name for m in matrices if m.block in last])

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        self.check(matrices, budget)
        ks = self.candidate_ks(matrices, budget)
        if len(ks) == 1:
            self.report = {"k": ks[0], "block_ratio": self.block_ratio(matrices, budget, ks[0])}
            return self.plan_for(matrices, budget, ks[0])
        if context is None or context.score is None:
            raise LrcError("ressvd_plc with k: search needs a validation scorer")
        results = []
        for k in ks:
            plan = self.plan_for(matrices, budget, k)
            score = context.score(plan, trial=len(results), k=k,
                                  block_ratio=self.block_ratio(matrices, budget, k))
            log.info("ressvd_plc k=%d: validation ppl %.4g", k, score.ppl)
            results.append((score.ppl, k, plan))
        ppl, k, plan = min(results, key=lambda r: (r[0], r[1]))
        self.report = {"k": k, "block_ratio": self.block_ratio(matrices, budget, k), "validation_ppl": ppl,
                       "searched": [r[1] for r in results]}
        return plan

