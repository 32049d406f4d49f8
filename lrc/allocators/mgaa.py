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

The stages are module functions (:func:`similarity_ratios`, :func:`sublayer_plan`) that the
composite allocator (:mod:`lrc.allocators.composite`) reuses.

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
        return similarity_ratios(params, importance, dict.fromkeys(params, ratio), ratio, self.scale,
                                 (self.min_ratio, self.max_ratio))

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        self.check(matrices, budget)
        members = sublayers_of(matrices)
        importance = sublayer_similarity(members, context, self.residual, "mgaa")
        params = {s: sum(m.shape[0] * m.shape[1] for m in ms) for s, ms in members.items()}
        ratios = self.sublayer_ratios(params, importance, budget.ratio)
        plan = sublayer_plan(members, ratios, self.inner, budget)
        self.report = {"sublayer_ratio": {f"{b}.{s}": round(r, 6) for (b, s), r in ratios.items()},
                       "sublayer_cosine": {f"{b}.{s}": round(v, 6) for (b, s), v in importance.items()}}
        return plan


def sublayers_of(matrices: Sequence[MatrixInfo]) -> dict[Sub, list[MatrixInfo]]:
    """The matrices of every (block, sublayer), in model order."""
    members: dict[Sub, list[MatrixInfo]] = defaultdict(list)
    for m in matrices:
        members[(m.block, m.sublayer)].append(m)
    return dict(members)


def sublayer_similarity(members: Mapping[Sub, Sequence[MatrixInfo]], context: AllocationContext | None,
                        residual: bool, who: str) -> dict[Sub, float]:
    """I_s: each sublayer's mean input/output cosine similarity (after the residual add, or before it)."""
    cosine = (context.sublayer_cosine if context else {}) or {}
    absent = [s for s in members if s not in cosine]
    if absent:
        raise LrcError(f"{who} needs the cosine statistic of every sublayer; none for {absent[:3]}")
    return {s: float(cosine[s][1 if residual else 0]) for s in members}


def similarity_ratios(params: Mapping[Sub, int], importance: Mapping[Sub, float], base: Mapping[Sub, float],
                      target: float, scale: float, bounds: tuple[float, float]) -> dict[Sub, float]:
    """r_s = base_s (1 + scale z_s), z_s the z-score of I_s over ``importance``'s groups, then one
    common shift (clipped to ``bounds``) so that the parameter-weighted removal is ``target``."""
    groups = list(params)
    values = [importance[g] for g in groups]
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    z = [(v - mean) / std if std > 0 else 0.0 for v in values]
    raw = [base[g] * (1.0 + scale * zs) for g, zs in zip(groups, z, strict=True)]
    fitted = project_ratios([params[g] for g in groups], raw, target, *bounds)
    return dict(zip(groups, fitted, strict=True))


def sublayer_plan(members: Mapping[Sub, Sequence[MatrixInfo]], ratios: Mapping[Sub, float], inner: str,
                  budget: Budget, fixed_dense: Sequence[Sub] = ()) -> RankPlan:
    """Each sublayer's budget split between its matrices, the whole fitted to ``budget`` exactly:
    equal energy retention inside each sublayer (``inner: energy``) or every matrix at its
    sublayer's ratio (``uniform``), then rank steps, one at a time, where a sublayer is furthest
    from its share. The sublayers in ``fixed_dense`` stay dense and are never adjusted."""
    plan: RankPlan = {}
    for sub, ms in members.items():
        if sub in fixed_dense:
            plan.update({m.name: min(m.shape) for m in ms})
        elif inner == "energy":
            plan.update(energy_plan(ms, Budget({m.name: m.shape for m in ms}, ratios[sub]))[0])
        else:
            plan.update({m.name: rank_for_ratio(m.shape, ratios[sub]) for m in ms})
    params = {s: sum(m.shape[0] * m.shape[1] for m in ms) for s, ms in members.items()}
    of = {m.name: s for s, ms in members.items() for m in ms}

    def deficit(name: str, current: Mapping[str, int]) -> float:  # sublayer furthest under its share
        sub = of[name]
        kept = sum(stored_params(m.shape, current[m.name]) for m in members[sub])
        return ((1.0 - ratios[sub]) * params[sub] - kept) / params[sub]

    adjustable = [m.name for s, ms in members.items() if s not in fixed_dense for m in ms] if fixed_dense else None
    return meet_budget(plan, budget, deficit, adjustable)
