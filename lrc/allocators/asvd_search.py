"""ASVD's sensitivity-based truncation-rank search (Yuan et al. 2023, hahnyuan/ASVD4LLM).

1. Sensitivity (sensitivity.py ``calib_sensitivity_ppl``): for every target matrix a and
   every candidate kept fraction c (default {0.4, ..., 0.9}, sensitivity.py L39), compress
   only a, to rank r = floor(c m n / (m + n)) (modules/svd_linear.py L39-42), with every
   other matrix dense, and measure the perplexity s(a, c) on held-out text.
2. Search (binary_search.py ``binary_search_truncation_rank``): sort all triples (a, c, s)
   by s, highest first (a stable sort: model order, then ascending c, breaks ties). For a
   cut index i, every matrix keeps c_a(i) = min{c : (a, c, .) in sorted[i:]} (1: dense), the
   smallest fraction whose sensitivity is at most the i-th highest; kept parameters grow
   with i. Bisect i for the largest cut whose plan fits the budget.
3. lrc meets the budget exactly: the released search stops within one (matrix, candidate)
   step of the target, on either side (binary_search.py L99-110); here every matrix is put at
   removal 1 - c_a and the plan is fitted exactly (:func:`plan_from_ratios`).

The sensitivity table goes into the report (result.json ``diagnostics.allocation``) and every
measurement is one trial (W&B ``trials`` table, trials.csv). Measurements are memoised by the
scorer, so every ratio of a sweep shares one table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lrc.allocators.base import AllocationContext, Allocator, MatrixInfo, RankPlan, Validation
from lrc.allocators.fitting import canonical_rank, plan_from_ratios
from lrc.budget import Budget
from lrc.errors import ConfigError, LrcError

log = logging.getLogger(__name__)
ASVD_CANDIDATES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def kept_rank(shape: tuple[int, int], kept: float) -> int:
    """ASVD's rank for a kept parameter fraction: floor(kept m n / (m + n)), canonical in lrc."""
    m, n = shape
    return canonical_rank(shape, int(m * n * kept) // (m + n))


class ASVDSensitivity(Allocator):
    def __init__(self, candidates: Sequence[float] = ASVD_CANDIDATES,
                 validation: Mapping[str, Any] | Validation | None = None) -> None:
        candidates = sorted({float(c) for c in candidates})
        if not candidates or any(not 0.0 < c < 1.0 for c in candidates):
            raise ConfigError(f"candidates={candidates!r} must be kept fractions in (0, 1)")
        self.candidates = candidates
        self.validation = Validation.build(validation)

    def sensitivity(self, matrices: Sequence[MatrixInfo], context: AllocationContext) -> dict[str, dict[float, float]]:
        """s(a, c): validation perplexity with only matrix a compressed, to kept fraction c."""
        dense = {m.name: min(m.shape) for m in matrices}
        table: dict[str, dict[float, float]] = {m.name: {} for m in matrices}
        for i, m in enumerate(matrices):
            for j, c in enumerate(self.candidates):
                score = context.score({**dense, m.name: kept_rank(m.shape, c)},
                                      trial=i * len(self.candidates) + j, matrix=m.name, kept=c)
                table[m.name][c] = score.ppl
            log.info("asvd sensitivity %d/%d %s: %s", i + 1, len(matrices), m.name,
                     ", ".join(f"{c:g}: {s:.4g}" for c, s in table[m.name].items()))
        return table

    def kept_at(self, ordered: Sequence[tuple[str, float, float]], cut: int) -> dict[str, float]:
        kept: dict[str, float] = {}
        for name, c, _ in ordered[cut:]:
            kept[name] = min(kept.get(name, 1.0), c)
        return kept

    def search(self, matrices: Sequence[MatrixInfo], budget: Budget,
               table: Mapping[str, Mapping[float, float]]) -> tuple[dict[str, float], int]:
        """The kept fraction of every matrix at the largest cut that fits the budget, and the cut."""
        order = {m.name: i for i, m in enumerate(matrices)}
        triples = [(name, c, s) for name, row in table.items() for c, s in row.items()]
        triples.sort(key=lambda t: (order[t[0]], t[1]))
        ordered = sorted(triples, key=lambda t: -t[2])  # stable: ties keep model order, ascending c

        def params(cut: int) -> int:
            kept = self.kept_at(ordered, cut)
            return sum(budget.stored(m.name, kept_rank(m.shape, kept[m.name]) if m.name in kept else min(m.shape))
                       for m in matrices)

        lo, hi = 0, len(ordered)  # params(lo) fits (see check): cut 0 puts every matrix at its smallest candidate
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if params(mid) <= budget.params_allowed:
                lo = mid
            else:
                hi = mid - 1
        kept = self.kept_at(ordered, lo)
        return {m.name: kept.get(m.name, 1.0) for m in matrices}, lo

    def tables(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        table = self.report.get("sensitivity", {})
        columns = ["matrix", *(f"ppl@kept={c:g}" for c in self.candidates), "kept"]
        return {"asvd_sensitivity": (columns, [[name, *(row[str(c)] for c in self.candidates),
                                                self.report["kept_fraction"][name]] for name, row in table.items()])}

    def check(self, matrices: Sequence[MatrixInfo], budget: Budget) -> None:
        """Every matrix at the smallest candidate must fit, else no cut can (checked before any work)."""
        smallest = sum(budget.stored(m.name, kept_rank(m.shape, self.candidates[0])) for m in matrices)
        if smallest > budget.params_allowed:
            raise ConfigError(f"asvd: even the smallest candidate kept fraction {self.candidates[0]} for every "
                              f"matrix stores {smallest} parameters, more than the {budget.params_allowed} allowed "
                              f"at ratio={budget.ratio:g}; add smaller candidates")

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        self.check(matrices, budget)
        if context is None or context.score is None:
            raise LrcError("asvd needs a validation scorer (the pipeline builds one from `validation`)")
        table = self.sensitivity(matrices, context)
        kept, cut = self.search(matrices, budget, table)
        plan = plan_from_ratios(matrices, budget, {name: 1.0 - k for name, k in kept.items()})
        self.report = {"cut": cut, "kept_fraction": kept,
                       "sensitivity": {name: {str(c): s for c, s in row.items()} for name, row in table.items()}}
        return plan
