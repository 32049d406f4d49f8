"""MGAA: multi-granular adaptive allocation (arXiv 2507.03294).

1. Between sublayers (each decoder block's attention and MLP): importance I_s is the mean
   cosine similarity of the sublayer's input and output hidden states over the calibration
   tokens (``residual``: output before the residual add, the default, or after it). A high
   similarity means the sublayer changes little, so it is compressed more:
   z_s = (I_s - mean I) / std I, raw ratio R (1 + scale z_s); one common shift then makes
   the parameter-weighted removal equal R exactly, every ratio clipped to [min_ratio, max_ratio].
2. Within a sublayer (``inner: energy``, the paper's): every matrix keeps the same fraction
   of its spectral energy, with the sublayer's parameter budget met (exact threshold search).
   ``inner: uniform`` gives every matrix the sublayer's ratio instead.

``spectrum``: the energy is measured on the spectrum the factorizer truncates
(``factorizer``, e.g. the whitened one) or on the plain weight's singular values (``weight``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence

from lrc.allocators.base import (
    AllocationContext,
    Allocator,
    MatrixInfo,
    RankPlan,
    check_ratio_bounds,
    check_ratio_within,
    check_spectrum_source,
)
from lrc.allocators.energy import energy_plan
from lrc.allocators.fitting import meet_budget, project_ratios
from lrc.budget import Budget, rank_for_ratio, stored_params
from lrc.errors import ConfigError, LrcError

INNER = ("energy", "uniform")
Sub = tuple[int, str]


class MGAA(Allocator):
    needs = frozenset({"cosine"})

    def __init__(self, scale: float = 0.5, residual: bool = False, inner: str = "energy",
                 spectrum: str = "factorizer", min_ratio: float = 0.0, max_ratio: float = 0.9) -> None:
        if inner not in INNER:
            raise ConfigError(f"inner={inner!r} is not one of {INNER}")
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ConfigError(f"scale={scale!r} must be a number >= 0")
        self.scale, self.residual, self.inner = float(scale), bool(residual), inner
        self.min_ratio, self.max_ratio = check_ratio_bounds(min_ratio, max_ratio)
        self.spectrum = check_spectrum_source(spectrum)
        self.spectrum_source = self.spectrum if inner == "energy" else None

    def check(self, matrices: Sequence[MatrixInfo], budget: Budget) -> None:
        check_ratio_within("mgaa", budget.ratio, self.min_ratio, self.max_ratio)

    def sublayer_ratios(self, params: Mapping[Sub, int], importance: Mapping[Sub, float],
                        ratio: float) -> dict[Sub, float]:
        """Removal ratio of every sublayer: z-scored importance around ``ratio``, exact in parameters."""
        subs = list(params)
        values = [importance[s] for s in subs]
        mean = statistics.fmean(values)
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        z = [(v - mean) / std if std > 0 else 0.0 for v in values]
        raw = [ratio * (1.0 + self.scale * zs) for zs in z]
        fitted = project_ratios([params[s] for s in subs], raw, ratio, self.min_ratio, self.max_ratio)
        return dict(zip(subs, fitted, strict=True))

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        self.check(matrices, budget)
        members: dict[Sub, list[MatrixInfo]] = defaultdict(list)
        for m in matrices:
            members[(m.block, m.sublayer)].append(m)
        cosine = (context.sublayer_cosine if context else {}) or {}
        absent = [s for s in members if s not in cosine]
        if absent:
            raise LrcError(f"mgaa needs the cosine statistic of every sublayer; none for {absent[:3]}")
        importance = {s: float(cosine[s][1 if self.residual else 0]) for s in members}
        params = {s: sum(m.shape[0] * m.shape[1] for m in ms) for s, ms in members.items()}
        ratios = self.sublayer_ratios(params, importance, budget.ratio)

        plan: RankPlan = {}
        for sub, ms in members.items():
            if self.inner == "energy":
                inner_budget = Budget({m.name: m.shape for m in ms}, ratios[sub])
                plan.update(energy_plan(ms, inner_budget)[0])
            else:
                plan.update({m.name: rank_for_ratio(m.shape, ratios[sub]) for m in ms})
        of = {m.name: (m.block, m.sublayer) for m in matrices}

        def deficit(name: str, current: Mapping[str, int]) -> float:  # sublayer furthest under its share
            sub = of[name]
            kept = sum(stored_params(m.shape, current[m.name]) for m in members[sub])
            return ((1.0 - ratios[sub]) * params[sub] - kept) / params[sub]

        plan = meet_budget(plan, budget, deficit)
        self.report = {"sublayer_ratio": {f"{b}.{s}": round(r, 6) for (b, s), r in ratios.items()},
                       "sublayer_cosine": {f"{b}.{s}": round(v, 6) for (b, s), v in importance.items()}}
        return plan
