"""Composite allocation: the seed methods' decisions in one plan (issue 18).

Three stages, each one seed method's logic, then an optional search over the knobs they leave:

1. **Blocks** (``blocks``): which decoder blocks are compressed, and at what ratio r_b.
   * ``all``: every block at the global ratio R;
   * ``last`` (ResSVD's partial-layer compression): the last k blocks at R P / P_k, the
     others dense (needs k > N R); ``k: null`` picks k on validation text as ResSVD does;
   * ``importance``: r_b = R (1 + block_scale z_b), z_b the z-score of block b's mean
     input/output similarity (the mean of its sublayers' similarities, as MGAA measures
     them), shifted so the parameter-weighted removal is R (a block that changes its input
     little is compressed more).
2. **Between sublayers** (``between``): ``similarity`` (MGAA): r_s = r_b (1 + scale z_s), z_s
   the z-score of the similarity over every compressed sublayer, then one common shift so the
   whole removes R; ``uniform``: r_s = r_b.
3. **Within a sublayer** (``within``): ``uniform`` (each matrix at r_s) or ``energy``
   (MGAA's equal energy retention); the plan is then fitted to the budget exactly.
4. **Search** (``search_trials`` > 0): a Gaussian-process search (optuna, as allocator
   ``bayes``) over the knobs the stages leave: k (``last``), block_scale (``importance``),
   scale (``similarity``) and, with ``projection_offsets``, one removal offset per projection
   type added to every matrix's ratio before the exact fit. The first trial is the configured
   knobs with zero offsets, so the search never returns something worse on validation.

With the other stages neutral it is each seed allocator: ``blocks=all between=similarity``
is :class:`~lrc.allocators.mgaa.MGAA` (same inner), ``blocks=last between=uniform
within=uniform`` is :class:`~lrc.allocators.ressvd_plc.ResSVDPLC` (tests check both plans are
identical). Every decision goes to ``report`` (result.json ``diagnostics.allocation``, W&B).
"""

from __future__ import annotations

import logging
import statistics
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lrc.allocators.base import (
    AllocationContext,
    Allocator,
    MatrixInfo,
    RankPlan,
    Score,
    Validation,
    blocks_of,
    check_ratio_bounds,
    check_ratio_within,
    check_spectrum_source,
)
from lrc.allocators.fitting import plan_from_ratios, project_ratios
from lrc.allocators.mgaa import INNER, similarity_ratios, sublayer_plan, sublayer_similarity, sublayers_of
from lrc.allocators.ressvd_plc import ResSVDPLC
from lrc.budget import Budget
from lrc.errors import ConfigError, LrcError

log = logging.getLogger(__name__)

BLOCKS = ("all", "last", "importance")
BETWEEN = ("similarity", "uniform")
Sub = tuple[int, str]


class Composite(Allocator):
    def __init__(self, blocks: str = "all", k: int | None = None, block_scale: float = 1.0,
                 between: str = "similarity", scale: float = 2.0, residual: bool = True, within: str = "uniform",
                 spectrum: str = "factorizer", min_ratio: float = 0.0, max_ratio: float = 0.9,
                 search_trials: int = 0, projection_offsets: bool = False, max_offset: float = 0.2,
                 max_scale: float = 4.0, seed: int = 0,
                 validation: Mapping[str, Any] | Validation | None = None) -> None:
        for key, value, allowed in (("blocks", blocks, BLOCKS), ("between", between, BETWEEN),
                                    ("within", within, INNER)):
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {allowed}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError(f"k={k!r} must be a positive integer or null (chosen on validation text)")
        for key, value in (("block_scale", block_scale), ("scale", scale), ("max_scale", max_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key}={value!r} must be a number >= 0")
        if not isinstance(search_trials, int) or isinstance(search_trials, bool) or search_trials < 0:
            raise ConfigError(f"search_trials={search_trials!r} must be an integer >= 0")
        if isinstance(max_offset, bool) or not isinstance(max_offset, (int, float)) or not 0 <= max_offset < 1:
            raise ConfigError(f"max_offset={max_offset!r} must be a number in [0, 1)")
        if projection_offsets and not search_trials:
            raise ConfigError("projection_offsets=true needs search_trials > 0 (the offsets are searched)")
        if projection_offsets and within != "uniform":
            raise ConfigError(f"projection_offsets=true needs within=uniform (offsets move each matrix's ratio); "
                              f"got within={within!r}")
        if search_trials:
            for key, value, used in (("scale", scale, between == "similarity"),
                                     ("block_scale", block_scale, blocks == "importance")):
                if used and value > max_scale:
                    raise ConfigError(f"{key}={value!r} is above max_scale={max_scale!r}: the search's first "
                                      "trial (the configured knobs) must lie in its range")
            if between != "similarity" and blocks != "importance" and not (blocks == "last" and k is None) \
                    and not projection_offsets:
                raise ConfigError(f"search_trials={search_trials}: with blocks={blocks!r}, between={between!r}, "
                                  "k given and no projection_offsets there is no knob to search")
        self.blocks, self.k, self.block_scale = blocks, k, float(block_scale)
        self.between, self.scale, self.residual, self.within = between, float(scale), bool(residual), within
        self.min_ratio, self.max_ratio = check_ratio_bounds(min_ratio, max_ratio)
        self.search_trials, self.projection_offsets = search_trials, bool(projection_offsets)
        self.max_offset, self.max_scale, self.seed = float(max_offset), float(max_scale), int(seed)
        self.spectrum = check_spectrum_source(spectrum)
        self.spectrum_source = self.spectrum if within == "energy" else None
        searches_k = blocks == "last" and k is None
        self.validation = Validation.build(validation) if search_trials or searches_k else None

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """The cosine statistic when a stage reads similarities."""
        return frozenset({"cosine"}) if self.between == "similarity" or self.blocks == "importance" else frozenset()

    # ------------------------------------------------------------------ stage 1: blocks
    def check(self, matrices: Sequence[MatrixInfo], budget: Budget) -> None:
        check_ratio_within("composite", budget.ratio, self.min_ratio, self.max_ratio)
        if self.blocks == "last":
            plc = ResSVDPLC(k=self.k) if self.k is not None else ResSVDPLC(k="search")
            try:
                plc.check(matrices, budget)
            except ConfigError as exc:
                raise ConfigError(f"composite blocks=last: {exc}".replace("ressvd_plc: ", "")) from None
            if not self.feasible_ks(matrices, budget):
                raise ConfigError(f"composite blocks=last between=similarity: no k leaves the last blocks' ratio "
                                  f"at or below max_ratio={self.max_ratio} (ratio={budget.ratio})")

    def feasible_ks(self, matrices: Sequence[MatrixInfo], budget: Budget) -> list[int]:
        """The k ResSVD's rule allows; with ``between=similarity`` also r_b <= max_ratio (the
        sublayer ratios spread around r_b within [min_ratio, max_ratio])."""
        ks = ResSVDPLC(k=self.k if self.k is not None else "search").candidate_ks(matrices, budget)
        if self.between == "similarity":
            ks = [k for k in ks if ResSVDPLC.block_ratio(matrices, budget, k) <= self.max_ratio]
        return ks

    def block_ratios(self, matrices: Sequence[MatrixInfo], budget: Budget, knobs: Mapping[str, float],
                     similarity: Mapping[Sub, float]) -> dict[int, float]:
        """r_b of every decoder block (0: dense)."""
        blocks = blocks_of(matrices)
        if self.blocks == "all":
            return dict.fromkeys(blocks, budget.ratio)
        if self.blocks == "last":
            k = int(knobs["k"])
            ratio = ResSVDPLC.block_ratio(matrices, budget, k)
            return {b: ratio if b in set(blocks[-k:]) else 0.0 for b in blocks}
        params = {b: 0 for b in blocks}
        for m in matrices:
            params[m.block] += m.shape[0] * m.shape[1]
        by_block = {b: statistics.fmean(v for (bb, _), v in similarity.items() if bb == b) for b in blocks}
        fitted = similarity_ratios(params, by_block, dict.fromkeys(blocks, budget.ratio), budget.ratio,
                                   knobs["block_scale"], (self.min_ratio, self.max_ratio))
        return {b: fitted[b] for b in blocks}

    # ------------------------------------------------------------------ stages 2 and 3
    def plan_for(self, matrices: Sequence[MatrixInfo], budget: Budget, knobs: Mapping[str, float],
                 similarity: Mapping[Sub, float]) -> tuple[RankPlan, dict[str, Any]]:
        """The plan for one setting of the knobs, and the decisions behind it."""
        members = sublayers_of(matrices)
        params = {s: sum(m.shape[0] * m.shape[1] for m in ms) for s, ms in members.items()}
        block_ratio = self.block_ratios(matrices, budget, knobs, similarity)
        compressed = [s for s in members if block_ratio[s[0]] > 0.0]
        ratios = {s: block_ratio[s[0]] for s in members}
        if self.between == "similarity":
            share = budget.ratio * sum(params.values()) / sum(params[s] for s in compressed)
            ratios.update(similarity_ratios({s: params[s] for s in compressed}, similarity,
                                            {s: block_ratio[s[0]] for s in compressed}, share, knobs["scale"],
                                            (self.min_ratio, self.max_ratio)))
        decisions = {"block_ratio": {str(b): round(r, 6) for b, r in block_ratio.items()},
                     "sublayer_ratio": {f"{b}.{s}": round(r, 6) for (b, s), r in ratios.items()}}
        offsets = {kind: knobs[f"offset/{kind}"] for kind in self.kinds(matrices)}
        dense = [s for s in members if s not in compressed]
        if not offsets and (self.between == "similarity" or self.within == "energy"):
            return sublayer_plan(members, ratios, self.within, budget, dense), decisions  # as MGAA fits its shares
        flat = [m for ms in members.values() for m in ms]
        moved = [m for s in compressed for m in members[s]]
        per_matrix = {m.name: ratios[(m.block, m.sublayer)] for m in flat}
        if offsets:  # (within=uniform) each matrix at r_s + offset(kind), one common shift so the whole removes R
            weights = [m.shape[0] * m.shape[1] for m in moved]
            share = budget.ratio * sum(m.shape[0] * m.shape[1] for m in flat) / sum(weights)
            fitted = project_ratios(weights, [per_matrix[m.name] + offsets[m.kind] for m in moved], share,
                                    self.min_ratio, self.max_ratio)
            per_matrix.update({m.name: r for m, r in zip(moved, fitted, strict=True)})
            decisions["offsets"] = {k: round(v, 6) for k, v in offsets.items()}
        # each matrix at its own ratio, fitted as ResSVD's partial layers are
        return plan_from_ratios(flat, budget, per_matrix, [m.name for m in moved]), decisions

    def kinds(self, matrices: Sequence[MatrixInfo]) -> list[str]:
        """The projection types that get a searched offset (none without ``projection_offsets``)."""
        return list(dict.fromkeys(m.kind for m in matrices)) if self.projection_offsets else []

    # ------------------------------------------------------------------ the plan
    def default_knobs(self, ks: Sequence[int]) -> dict[str, float]:
        knobs: dict[str, float] = {}
        if self.blocks == "last":
            knobs["k"] = ks[0]  # k given: the one feasible k; k searched: overridden by the search
        if self.blocks == "importance":
            knobs["block_scale"] = self.block_scale
        if self.between == "similarity":
            knobs["scale"] = self.scale
        return knobs

    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget,
                 context: AllocationContext | None = None) -> RankPlan:
        self.check(matrices, budget)
        members = sublayers_of(matrices)
        similarity = sublayer_similarity(members, context, self.residual, "composite") if self.needs else {}
        ks = self.feasible_ks(matrices, budget) if self.blocks == "last" else []
        searched_k = self.blocks == "last" and self.k is None and len(ks) > 1
        if (self.search_trials or searched_k) and (context is None or context.score is None):
            raise LrcError("composite: a search over its knobs needs a validation scorer")
        if self.search_trials:
            knobs, searched = self.search(matrices, budget, similarity, ks, context)
        elif searched_k:  # ResSVD's choice of k: every feasible k, the smallest validation perplexity
            knobs, searched = self.choose_k(matrices, budget, similarity, ks, context)
        else:
            knobs, searched = self.default_knobs(ks), {}
        plan, decisions = self.plan_for(matrices, budget, knobs, similarity)
        self.report = {"blocks": self.blocks, "between": self.between, "within": self.within,
                       **{f"knob/{k}": v for k, v in knobs.items()}, "knobs": dict(knobs), **decisions, **searched}
        return plan

    def tables(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """The decisions as W&B tables: the ratio of every block and sublayer, and the knobs used."""
        report = self.report
        if not report:
            return {}
        sublayers = [[*key.split("."), r] for key, r in report["sublayer_ratio"].items()]
        return {"composite_blocks": (["block", "ratio"], [[int(b), r] for b, r in report["block_ratio"].items()]),
                "composite_sublayers": (["block", "sublayer", "ratio"], [[int(b), s, r] for b, s, r in sublayers]),
                "composite_knobs": (["knob", "value"], [[k, v] for k, v in report["knobs"].items()])}

    def choose_k(self, matrices: Sequence[MatrixInfo], budget: Budget, similarity: Mapping[Sub, float],
                 ks: Sequence[int], context: AllocationContext) -> tuple[dict[str, float], dict[str, Any]]:
        results = []
        for k in ks:
            knobs = {**self.default_knobs(ks), "k": k}
            score = context.score(self.plan_for(matrices, budget, knobs, similarity)[0], trial=len(results), k=k)
            log.info("composite k=%d: validation ppl %.4g", k, score.ppl)
            results.append((score.ppl, k))
        ppl, k = min(results)
        return {**self.default_knobs(ks), "k": k}, {"validation_ppl": ppl, "searched_k": [r[1] for r in results]}

    def search(self, matrices: Sequence[MatrixInfo], budget: Budget, similarity: Mapping[Sub, float],
               ks: Sequence[int], context: AllocationContext) -> tuple[dict[str, float], dict[str, Any]]:
        """A GP search over the knobs, the configured knobs first; returns the best knobs and its record."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.GPSampler(seed=self.seed, n_startup_trials=min(5, self.search_trials),
                                                deterministic_objective=True)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        kinds = self.kinds(matrices)
        first = {**self.default_knobs(ks), **{f"offset/{kind}": 0.0 for kind in kinds}}
        if self.blocks == "last" and self.k is None:
            first["k"] = ks[len(ks) // 2]
        study.enqueue_trial(first)
        best: tuple[float, dict[str, float], Score] | None = None
        for number in range(self.search_trials):
            trial = study.ask()
            knobs: dict[str, float] = {}
            if self.blocks == "last":
                knobs["k"] = trial.suggest_int("k", min(ks), max(ks)) if self.k is None else ks[0]
            if self.blocks == "importance":
                knobs["block_scale"] = trial.suggest_float("block_scale", 0.0, self.max_scale)
            if self.between == "similarity":
                knobs["scale"] = trial.suggest_float("scale", 0.0, self.max_scale)
            for kind in kinds:
                knobs[f"offset/{kind}"] = trial.suggest_float(f"offset/{kind}", -self.max_offset, self.max_offset)
            if self.blocks == "last" and int(knobs["k"]) not in ks:  # k outside the feasible set
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            plan, _ = self.plan_for(matrices, budget, knobs, similarity)
            score = context.score(plan, trial=number, **knobs)
            study.tell(trial, score.objective)
            log.info("composite trial %d/%d: objective %.4g (ppl %.4g) %s", number + 1, self.search_trials,
                     score.objective, score.ppl, knobs)
            if best is None or score.objective < best[0]:
                best = (score.objective, knobs, score)
        if best is None:
            raise LrcError("composite: no trial of the search could be scored")
        objective, knobs, score = best
        return knobs, {"search": {"trials": self.search_trials, "best_objective": objective,
                                  "best_ppl": score.ppl, "first_knobs": first}}
