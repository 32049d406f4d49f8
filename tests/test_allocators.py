"""Contract tests shared by every allocator, and each allocator's own behaviour."""

import math

import pytest
import torch

from lrc.allocators.asvd_search import ASVDSensitivity, kept_rank
from lrc.allocators.base import AllocationContext, MatrixInfo, Score, Validation
from lrc.allocators.bayes import Bayes, window_rank
from lrc.allocators.composite import Composite
from lrc.allocators.energy import Energy
from lrc.allocators.fitting import energy_curve, meet_budget, project_ratios, ratio_priority
from lrc.allocators.keep_dense import KeepDense
from lrc.allocators.mgaa import MGAA
from lrc.allocators.ressvd_plc import ResSVDPLC
from lrc.allocators.uniform import Uniform
from lrc.budget import Budget, break_even_rank, check_plan, stored_params, uniform_rank
from lrc.errors import BudgetError, ConfigError

# One GQA decoder block (hidden 96, 6 q heads / 2 kv heads of 16, MLP 256), six blocks.
BLOCK = {"q_proj": ("attn", (96, 96)), "k_proj": ("attn", (32, 96)), "v_proj": ("attn", (32, 96)),
         "o_proj": ("attn", (96, 96)), "gate_proj": ("mlp", (256, 96)), "up_proj": ("mlp", (256, 96)),
         "down_proj": ("mlp", (96, 256))}
BLOCKS = 6


def matrices(gen: torch.Generator) -> list[MatrixInfo]:
    out = []
    for block in range(BLOCKS):
        for kind, (sub, shape) in BLOCK.items():
            decay = torch.rand((), generator=gen, dtype=torch.float64) * 0.2 + 0.01
            spectrum = torch.exp(-decay * torch.arange(min(shape), dtype=torch.float64))
            spectrum = spectrum * (1 + 0.1 * torch.rand(min(shape), generator=gen, dtype=torch.float64))
            out.append(MatrixInfo(f"layers.{block}.{kind}", shape, block, sub, kind,
                                  torch.sort(spectrum, descending=True).values))
    return out


def lost_energy(mats):
    """A synthetic validation score: parameter-weighted spectral energy the plan discards."""
    curves = {m.name: energy_curve(m.spectrum) for m in mats}

    def score(plan, **info):
        loss = sum((1 - float(curves[m.name][min(plan[m.name], curves[m.name].numel()) - 1])) * m.block
                   for m in mats)
        return Score(objective=loss, ppl=math.exp(loss), kl=0.0)
    return score


def cosines(mats, gen):
    return {(m.block, m.sublayer): (float(torch.rand((), generator=gen)), 0.9) for m in mats}


# name -> (allocator factory, context factory)
ALLOCATORS = {
    "uniform": (Uniform, lambda mats, gen: None),
    "energy": (Energy, lambda mats, gen: None),
    "mgaa": (MGAA, lambda mats, gen: AllocationContext(sublayer_cosine=cosines(mats, gen))),
    "mgaa_uniform_inner": (lambda: MGAA(inner="uniform", scale=1.0),
                           lambda mats, gen: AllocationContext(sublayer_cosine=cosines(mats, gen))),
    "bayes": (lambda: Bayes(n_trials=6, startup_trials=3, sampler="tpe"),
              lambda mats, gen: AllocationContext(score=lost_energy(mats))),
    "ressvd_plc": (ResSVDPLC, lambda mats, gen: AllocationContext(score=lost_energy(mats))),
    "asvd": (lambda: ASVDSensitivity(candidates=[0.1, 0.3, 0.5, 0.7, 0.9]),
             lambda mats, gen: AllocationContext(score=lost_energy(mats))),
    "bayes_window": (lambda: Bayes(n_trials=6, startup_trials=2, sampler="tpe", budget="window", rank_multiple=8,
                                   min_ratio=-0.001, max_ratio=0.95),
                     lambda mats, gen: AllocationContext(score=lost_energy(mats))),
    "keep_dense_mgaa": (lambda: KeepDense(MGAA(), ["v_proj"]),
                        lambda mats, gen: AllocationContext(sublayer_cosine=cosines(mats, gen))),
    "composite_importance_energy": (lambda: Composite(blocks="importance", within="energy", scale=1.0),
                                    lambda mats, gen: AllocationContext(sublayer_cosine=cosines(mats, gen))),
    "composite_last_search": (lambda: Composite(blocks="last", search_trials=4, projection_offsets=True),
                              lambda mats, gen: AllocationContext(sublayer_cosine=cosines(mats, gen),
                                                                  score=lost_energy(mats))),
    "keep_dense_bayes": (lambda: KeepDense(Bayes(n_trials=4, startup_trials=2, sampler="tpe",
                                                 groups=[["q_proj", "k_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                                                         ["down_proj"]]), ["v_proj"]),
                         lambda mats, gen: AllocationContext(score=lost_energy(mats))),
}


def allocate(name, mats, ratio, seed=0):
    make, context = ALLOCATORS[name]
    budget = Budget({m.name: m.shape for m in mats}, ratio)
    allocator = make()
    allocator.check(mats, budget)
    return allocator.allocate(mats, budget, context(mats, torch.Generator().manual_seed(seed))), budget


@pytest.mark.parametrize("name", ALLOCATORS)
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.6, 0.8])
def test_plan_meets_budget_exactly(name, ratio, rng):
    mats = matrices(rng)
    plan, budget = allocate(name, mats, ratio)
    check_plan(plan, budget)  # never over, under by less than one rank step per matrix
    assert budget.params_after(plan) <= budget.params_allowed
    assert budget.params_allowed - budget.params_after(plan) < budget.slack
    for m in mats:  # factorized at a rank that saves parameters, or kept dense
        assert 1 <= plan[m.name] <= break_even_rank(m.shape) or plan[m.name] == min(m.shape)


@pytest.mark.parametrize("name", ALLOCATORS)
def test_deterministic(name, rng):
    mats = matrices(rng)
    assert allocate(name, mats, 0.3)[0] == allocate(name, mats, 0.3)[0]


def test_uniform_equals_closed_form(rng):
    mats = matrices(rng)
    plan, _ = allocate("uniform", mats, 0.35)
    assert plan == {m.name: int((1 - 0.35) * m.shape[0] * m.shape[1] // (m.shape[0] + m.shape[1])) for m in mats}
    assert plan["layers.0.k_proj"] == uniform_rank((32, 96), 0.35) == 15


# ---------------------------------------------------------------- fitting helpers

def test_project_ratios_is_exact_and_clipped():
    weights, raw = [1.0, 2.0, 3.0, 4.0], [-0.5, 0.3, 0.4, 1.4]
    fitted = project_ratios(weights, raw, 0.45, 0.0, 0.9)
    assert sum(w * r for w, r in zip(weights, fitted, strict=True)) / sum(weights) == pytest.approx(0.45, abs=1e-12)
    assert fitted == pytest.approx([0.0, 0.12, 0.22, 0.9])  # one common shift of -0.18, ends clipped
    with pytest.raises(ConfigError, match="ratio=0.95 is outside"):
        project_ratios(weights, raw, 0.95, 0.0, 0.9)


def test_meet_budget_trims_and_tops_up(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.5)
    priority = ratio_priority(budget.shapes, dict.fromkeys(budget.shapes, 0.5))
    over = meet_budget({m.name: min(m.shape) for m in mats}, budget, priority)  # starts dense
    under = meet_budget(dict.fromkeys(budget.shapes, 1), budget, priority)  # starts at rank 1
    for plan in (over, under):
        check_plan(plan, budget)
        assert budget.params_allowed - budget.params_after(plan) < min(m + n for m, n in budget.shapes.values())
    with pytest.raises(BudgetError, match="every adjustable matrix is at rank 1"):
        meet_budget({m.name: min(m.shape) for m in mats}, budget, priority, adjustable=[mats[0].name])


# ---------------------------------------------------------------- energy

def test_energy_keeps_a_common_energy_fraction(rng):
    mats = matrices(rng)
    allocator = Energy()
    budget = Budget({m.name: m.shape for m in mats}, 0.4)
    plan = allocator.allocate(mats, budget)
    t = allocator.report["energy_threshold"]
    for m in mats:
        curve = energy_curve(m.spectrum)
        r = plan[m.name]
        if r < min(m.shape):
            assert curve[r - 1] >= t - 1e-12  # reaches the threshold ...
            if r > 1:  # ... and one rank less would not, except for a leftover top-up step
                assert curve[r - 2] < t or curve[r - 3] < t
    # a flatter spectrum needs a larger fraction of its rank for the same energy
    flat = MatrixInfo("flat", (64, 64), 0, "attn", "q_proj", torch.ones(64, dtype=torch.float64))
    steep = MatrixInfo("steep", (64, 64), 0, "attn", "k_proj", 0.8 ** torch.arange(64, dtype=torch.float64))
    pair = Energy().allocate([flat, steep], Budget({"flat": (64, 64), "steep": (64, 64)}, 0.5))
    assert pair["flat"] > 4 * pair["steep"]


def test_energy_errors_without_spectra():
    m = MatrixInfo("a", (8, 8), 0, "attn", "q_proj")
    with pytest.raises(ConfigError, match="needs the spectrum"):
        Energy().allocate([m], Budget({"a": (8, 8)}, 0.5))
    with pytest.raises(ConfigError, match="spectrum='nope'"):
        Energy(spectrum="nope")


# ---------------------------------------------------------------- mgaa

def test_mgaa_compresses_low_similarity_sublayers_less(rng):
    mats = matrices(rng)
    # hand-made: blocks 0-2 attention changes its input a lot (low similarity = important)
    cos = {(b, s): (0.1 if b < 3 and s == "attn" else 0.6 + 0.02 * b, 0.9) for b in range(BLOCKS)
           for s in ("attn", "mlp")}
    allocator = MGAA(scale=0.5)
    budget = Budget({m.name: m.shape for m in mats}, 0.4)
    plan = allocator.allocate(mats, budget, AllocationContext(sublayer_cosine=cos))
    check_plan(plan, budget)
    ratios = allocator.report["sublayer_ratio"]
    low = [ratios[f"{b}.attn"] for b in range(3)]
    high = [ratios[f"{b}.attn"] for b in range(3, BLOCKS)]
    assert max(low) < min(high)
    mlp = [ratios[f"{b}.mlp"] for b in range(BLOCKS)]
    assert mlp == sorted(mlp)  # similarity grows with depth, so does removal

    def removed(block, sub):
        ms = [m for m in mats if m.block == block and m.sublayer == sub]
        dense = sum(m.shape[0] * m.shape[1] for m in ms)
        return 1 - sum(stored_params(m.shape, plan[m.name]) for m in ms) / dense

    assert max(removed(b, "attn") for b in range(3)) < min(removed(b, "attn") for b in range(3, BLOCKS))
    # the parameter-weighted sublayer ratios are exactly the target
    sub_params = {f"{b}.{s}": sum(m.shape[0] * m.shape[1] for m in mats if (m.block, m.sublayer) == (b, s))
                  for b in range(BLOCKS) for s in ("attn", "mlp")}
    assert sum(ratios[k] * p for k, p in sub_params.items()) / sum(sub_params.values()) == pytest.approx(0.4)


def test_mgaa_scale_zero_and_residual_option(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)
    cos = {(b, s): (0.1 * b, 0.5) for b in range(BLOCKS) for s in ("attn", "mlp")}
    flat = MGAA(scale=0.0, inner="uniform")
    flat.allocate(mats, budget, AllocationContext(sublayer_cosine=cos))
    assert list(flat.report["sublayer_ratio"].values()) == pytest.approx([0.3] * 2 * BLOCKS)
    residual = MGAA(residual=True)  # the after-residual similarities are all equal here
    residual.allocate(mats, budget, AllocationContext(sublayer_cosine=cos))
    assert list(residual.report["sublayer_ratio"].values()) == pytest.approx([0.3] * 2 * BLOCKS)


def test_mgaa_bad_options():
    with pytest.raises(ConfigError, match="inner='best'"):
        MGAA(inner="best")
    with pytest.raises(ConfigError, match="ratio=0.95 is outside"):
        MGAA().check([], Budget({}, 0.95))
    assert MGAA(inner="uniform").spectrum_source is None and MGAA(spectrum="weight").spectrum_source == "weight"


# ---------------------------------------------------------------- ressvd_plc

def test_ressvd_plc_leaves_the_first_blocks_dense(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)  # N R = 1.8, so k >= 2
    allocator = ResSVDPLC(k=3)
    allocator.check(mats, budget)
    plan = allocator.allocate(mats, budget)
    check_plan(plan, budget)
    for m in mats:
        if m.block < BLOCKS - 3:
            assert plan[m.name] == min(m.shape)
        else:
            assert plan[m.name] <= break_even_rank(m.shape)
    assert allocator.report["block_ratio"] == pytest.approx(BLOCKS * 0.3 / 3)
    k_n = ResSVDPLC(k=BLOCKS).allocate(mats, budget)  # k = N is uniform, up to the top-up
    uniform = Uniform().allocate(mats, budget)
    assert all(abs(k_n[n] - uniform[n]) <= 1 for n in uniform)


def test_ressvd_plc_search_picks_the_best_validation_k(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)
    seen = []

    def score(plan, k, **info):  # pretend k = 4 validates best
        seen.append(k)
        return Score(objective=abs(k - 4), ppl=10 + abs(k - 4), kl=0.0)

    allocator = ResSVDPLC(k="search")
    plan = allocator.allocate(mats, budget, AllocationContext(score=score))
    assert seen == [2, 3, 4, 5, 6]  # every feasible k: k > N R = 1.8
    assert allocator.report["k"] == 4 and plan == ResSVDPLC(k=4).allocate(mats, budget)
    assert ResSVDPLC(k="search", candidates=[1, 3, 5]).candidate_ks(mats, budget) == [3, 5]


@pytest.mark.parametrize("k, message", [(1, "k=1 must exceed N\\*R = 6\\*0.3 = 1.8"),
                                        (7, "k=7 is outside \\[1, N=6\\]")])
def test_ressvd_plc_infeasible_k_is_a_clear_error(k, message, rng):
    mats = matrices(rng)
    with pytest.raises(ConfigError, match=message):
        ResSVDPLC(k=k).check(mats, Budget({m.name: m.shape for m in mats}, 0.3))
    with pytest.raises(ConfigError, match="k='some'"):
        ResSVDPLC(k="some")


# ---------------------------------------------------------------- bayes

def test_bayes_finds_a_known_optimum(rng):
    """Synthetic objective: squared distance of the realised group ratios to a feasible optimum."""
    mats = [m for m in matrices(rng) if m.block < 2]
    budget = Budget({m.name: m.shape for m in mats}, 0.4)
    groups = [["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    params = {"attn": 0, "gu": 0, "down": 0}
    member = {}
    for m in mats:
        g = "attn" if m.sublayer == "attn" else ("down" if m.kind == "down_proj" else "gu")
        member[m.name] = g
        params[g] += m.shape[0] * m.shape[1]
    # an optimum on the budget: attention 0.2, gate/up 0.55, down set by the budget
    target = {"attn": 0.2, "gu": 0.55}
    target["down"] = (0.4 * sum(params.values()) - sum(target[g] * params[g] for g in target)) / params["down"]
    assert 0 < target["down"] < 0.9

    def score(plan, **info):
        realised = {g: 1 - sum(stored_params(m.shape, plan[m.name]) for m in mats if member[m.name] == g) / p
                    for g, p in params.items()}
        loss = sum((realised[g] - target[g]) ** 2 for g in params)
        return Score(objective=loss, ppl=loss, kl=0.0)

    allocator = Bayes(n_trials=30, groups=groups, sampler="gp", startup_trials=8, seed=0)
    allocator.check(mats, budget)
    plan = allocator.allocate(mats, budget, AllocationContext(score=score))
    check_plan(plan, budget)
    best = allocator.report["best_ratios"]
    assert best["q+k+v+o"] == pytest.approx(0.2, abs=0.03)
    assert best["gate+up"] == pytest.approx(0.55, abs=0.03)
    assert score(plan).objective < 1e-3 < score(Uniform().allocate(mats, budget)).objective


def test_bayes_depth_groups_and_trial_logging(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)
    rows = []

    def score(plan, **info):
        rows.append(info)
        return lost_energy(mats)(plan)

    allocator = Bayes(n_trials=4, depth_groups=2, sampler="tpe", startup_trials=2)
    assert set(allocator.group_of(mats).values()) == {f"{g}@d{d}" for g in ("q+k", "v", "o", "gate", "up", "down")
                                                      for d in (0, 1)}
    allocator.allocate(mats, budget, AllocationContext(score=score))
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    assert all(r[f"ratio/{g}"] == pytest.approx(0.3) for g in allocator.group_of(mats).values()
               for r in rows[:1])  # the first trial is the uniform plan (warm start)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_trials": 0}, "n_trials=0 must be an integer >= 1"),
    ({"sampler": "grid"}, "sampler='grid'"),
    ({"groups": [["q_proj"], ["q_proj"]]}, "names a projection twice"),
    ({"depth_groups": 0}, "depth_groups=0"),
])
def test_bayes_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Bayes(**kwargs)


def test_bayes_unknown_group_name_is_caught_before_heavy_work(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)
    with pytest.raises(ConfigError, match=r"unknown group name\(s\) \['qkv_proj'\]"):
        Bayes(groups=[["qkv_proj"], ["o_proj"]]).check(mats, budget)
    with pytest.raises(ConfigError, match=r"projections \['down_proj'\] are in no group"):
        Bayes(groups=[["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj"]]).check(mats, budget)


# ---------------------------------------------------------------- keep_dense

@pytest.mark.parametrize("inner", [Uniform, Energy, lambda: ResSVDPLC(k=5)])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_keep_dense_leaves_projections_dense_and_meets_the_budget_exactly(inner, ratio, rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, ratio)
    allocator = KeepDense(inner(), ["v_proj", "o_proj"])
    allocator.check(mats, budget)
    plan = allocator.allocate(mats, budget, AllocationContext(score=lost_energy(mats)))
    check_plan(plan, budget)
    assert all(plan[m.name] == min(m.shape) for m in mats if m.kind in ("v_proj", "o_proj"))
    # the others carry the whole removal: exactly what the budget allows minus the dense matrices
    others = sum(budget.stored(m.name, plan[m.name]) for m in mats if m.kind not in ("v_proj", "o_proj"))
    dense = sum(m.shape[0] * m.shape[1] for m in mats if m.kind in ("v_proj", "o_proj"))
    assert 0 <= budget.params_allowed - dense - others < budget.slack
    assert allocator.report["others_ratio"] > ratio


def test_keep_dense_errors_name_the_numbers(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.8)
    with pytest.raises(BudgetError, match=r"keep_dense=\['gate_proj', 'up_proj', 'down_proj'\].*leaves -?\d+ of the "
                                          r"\d+ parameters allowed at ratio=0.8"):
        KeepDense(Uniform(), ["gate_proj", "up_proj", "down_proj"]).check(mats, budget)
    with pytest.raises(ConfigError, match=r"keep_dense: unknown projection\(s\) \['wv'\]"):
        KeepDense(Uniform(), ["wv"]).check(mats, budget)
    with pytest.raises(ConfigError, match=r"must lose 0.8\d+ of their parameters; mgaa: ratio=0.8\d+ is outside"):
        KeepDense(MGAA(max_ratio=0.8), ["v_proj"]).check(mats, budget)


def test_budget_counts_the_bias_a_factorization_adds(rng):
    """feature_pca adds an m-vector bias to a linear without one: it is stored, so it is budgeted."""
    mats = matrices(rng)
    shapes = {m.name: m.shape for m in mats}
    budget = Budget(shapes, 0.3, extra={name: shape[0] for name, shape in shapes.items()})
    for name in ALLOCATORS:
        make, context = ALLOCATORS[name]
        plan = make().allocate(mats, budget, context(mats, torch.Generator().manual_seed(0)))
        check_plan(plan, budget)
        with_bias = sum(stored_params(shapes[n], r) + (shapes[n][0] if r < min(shapes[n]) else 0)
                        for n, r in plan.items())
        assert with_bias <= budget.params_allowed, name


# ---------------------------------------------------------------- asvd

def test_asvd_search_compresses_the_less_sensitive_matrix_more():
    """Two equal matrices; compressing A hurts far more than compressing B at every kept fraction."""
    shape = (64, 64)
    mats = [MatrixInfo("A", shape, 0, "attn", "q_proj"), MatrixInfo("B", shape, 0, "attn", "o_proj")]
    sensitivity = {"A": lambda kept: 100 - 90 * kept, "B": lambda kept: 12 - 2 * kept}
    calls = []

    def score(plan, **info):
        compressed = [n for n in plan if plan[n] < 64]
        assert len(compressed) <= 1  # one matrix at a time, the other dense
        calls.append(info)
        ppl = 10.0 if not compressed else sensitivity[compressed[0]](info["kept"])
        return Score(objective=ppl, ppl=ppl, kl=0.0)

    budget = Budget({"A": shape, "B": shape}, 0.3)
    allocator = ASVDSensitivity(candidates=[0.2, 0.4, 0.6, 0.8])
    plan = allocator.allocate(mats, budget, AllocationContext(score=score))
    check_plan(plan, budget)
    assert len(calls) == 8 and {c["matrix"] for c in calls} == {"A", "B"}
    assert plan["B"] < plan["A"]
    assert plan["B"] <= kept_rank(shape, 0.4)  # B takes (at least) the removal A avoids
    assert allocator.report["sensitivity"]["A"]["0.2"] == pytest.approx(82.0)


def test_asvd_search_unreachable_budget_is_a_clear_error(rng):
    mats = matrices(rng)
    with pytest.raises(ConfigError, match=r"smallest candidate kept fraction 0.4 .* ratio=0.8; add smaller"):
        ASVDSensitivity().allocate(mats, Budget({m.name: m.shape for m in mats}, 0.8),
                                   AllocationContext(score=lost_energy(mats)))


# ---------------------------------------------------------------- bayes as released (budget window)

def test_window_rank_is_bolacos_rounding():
    """prune_bbo.py L198-200: ceil(kept m n / (m + n)) floored to a multiple of 8."""
    assert window_rank((4096, 4096), 0.5, 8) == 1024
    assert window_rank((4096, 4096), 0.2, 8) == 1632
    assert window_rank((4096, 11008), 0.2, 8) == 2384
    assert window_rank((96, 96), -0.001, 8) == 96  # kept >= 1: dense


def test_bayes_window_scores_only_candidates_inside_the_window(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)
    removed, scored = [], []

    def score(plan, **info):
        if not info.get("final"):
            ratios = {k.removeprefix("ratio/"): v for k, v in info.items() if k.startswith("ratio/")}
            group = allocator.group_of(mats)
            scored.append((plan, {m.name: window_rank(m.shape, ratios[group[m.name]], 8) for m in mats}))
            removed.append(sum(ratios[allocator.group_of(mats)[m.name]] * m.shape[0] * m.shape[1] for m in mats)
                           / budget.params_before)
        return lost_energy(mats)(plan)

    start = {"q+k": 0.5, "v": 0.3, "o": 0.5, "gate": 0.3, "up": 0.3, "down": 0.3}
    allocator = Bayes(n_trials=8, startup_trials=2, sampler="gp", budget="window", window=0.1, start=start,
                      min_ratio=-0.001, max_ratio=0.8, rank_multiple=8)
    plan = allocator.allocate(mats, budget, AllocationContext(score=score))
    check_plan(plan, budget)  # the best trial's plan, fitted to the budget exactly
    assert len(removed) == 8 and all(0.3 - 1e-9 <= r <= 0.4 + 1e-9 for r in removed)
    assert removed[0] == pytest.approx(sum(start[allocator.group_of(mats)[m.name]] * m.shape[0] * m.shape[1]
                                           for m in mats) / budget.params_before)
    assert all(plan == bolaco_plan for plan, bolaco_plan in scored)  # Bolaco's ranks, unfitted
    report = allocator.report
    assert report["final_objective"] == lost_energy(mats)(plan).objective


def test_ressvd_plc_takes_no_kl_options():
    """ResSVD picks k by validation perplexity alone: a KL weight would silently do nothing."""
    with pytest.raises(ConfigError, match=r"perplexity alone; validation options \['kl_weight'\]"):
        ResSVDPLC(validation={"kl_weight": 1.0})
    assert ResSVDPLC(validation={"nsamples": 2}).validation.nsamples == 2


@pytest.mark.parametrize("options, message", [
    ({"kl_reduction": "sum"}, "kl_reduction='sum' is not one of"),
    ({"objective": "nll"}, "objective='nll' is not one of"),
])
def test_validation_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        Validation.build(options)


def test_validation_objectives():
    assert Validation(seqlen=100, kl_weight=1e-3, kl_reduction="window_sum").score(20.0, 0.5).objective == \
        pytest.approx(20.0 + 1e-3 * 0.5 * 100)
    assert Validation(kl_weight=2.0, objective="log").score(math.e ** 3 - 0.5, 0.25).objective == pytest.approx(3.0)
    assert Validation(seqlen=100, kl_reduction="window_sum").score(5.0, 0.5, window_length=10).kl == 5.0


# ---------------------------------------------------------------- composite

def with_cosines(mats, gen, score=None):
    return AllocationContext(sublayer_cosine=cosines(mats, gen), score=score)


@pytest.mark.parametrize("inner", ["energy", "uniform"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_composite_over_all_blocks_is_mgaa(inner, ratio, rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, ratio)
    context = with_cosines(mats, torch.Generator().manual_seed(1))
    mgaa = MGAA(scale=0.7, residual=False, inner=inner)
    composite = Composite(blocks="all", between="similarity", scale=0.7, residual=False, within=inner)
    assert composite.allocate(mats, budget, context) == mgaa.allocate(mats, budget, context)
    assert composite.report["sublayer_ratio"] == mgaa.report["sublayer_ratio"]


@pytest.mark.parametrize("k", [3, 5, None])
def test_composite_over_the_last_blocks_is_ressvd(k, rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)
    context = AllocationContext(score=lost_energy(mats))
    plc = ResSVDPLC(k=k if k is not None else "search")
    composite = Composite(blocks="last", k=k, between="uniform", within="uniform")
    assert composite.needs == frozenset()
    plan = composite.allocate(mats, budget, context)
    assert plan == plc.allocate(mats, budget, context)
    assert composite.report["knobs"]["k"] == plc.report["k"]
    dense_blocks = [b for b, r in composite.report["block_ratio"].items() if r == 0.0]
    assert len(dense_blocks) == BLOCKS - plc.report["k"]


def test_composite_block_importance_compresses_unchanging_blocks_more(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)
    # block b's sublayers change their input less (higher similarity) the deeper the block
    cosine = {(m.block, m.sublayer): (0.1 * m.block, 0.5 + 0.05 * m.block) for m in mats}
    allocator = Composite(blocks="importance", block_scale=0.5, between="uniform", within="uniform")
    plan = allocator.allocate(mats, budget, AllocationContext(sublayer_cosine=cosine))
    ratios = [allocator.report["block_ratio"][str(b)] for b in range(BLOCKS)]
    assert ratios == sorted(ratios) and ratios[0] < 0.3 < ratios[-1]
    kept = [sum(stored_params(m.shape, plan[m.name]) for m in mats if m.block == b) for b in range(BLOCKS)]
    assert kept == sorted(kept, reverse=True)
    flat = Composite(blocks="importance", block_scale=0.0, between="uniform")
    assert flat.allocate(mats, budget, AllocationContext(sublayer_cosine=cosine)) == \
        Composite(blocks="all", between="uniform").allocate(mats, budget)


def test_composite_search_never_returns_worse_than_its_first_trial(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.4)
    scored = []
    base = lost_energy(mats)

    def score(plan, **info):
        result = base(plan)
        scored.append((result.objective, info))
        return result

    allocator = Composite(blocks="importance", search_trials=6, projection_offsets=True, max_offset=0.1)
    plan = allocator.allocate(mats, budget, with_cosines(mats, torch.Generator().manual_seed(2), score))
    check_plan(plan, budget)
    first_objective, first_knobs = scored[0]
    assert first_knobs["scale"] == 2.0 and first_knobs["block_scale"] == 1.0
    assert all(first_knobs[f"offset/{kind}"] == 0.0 for kind in BLOCK)
    report = allocator.report
    assert report["search"]["best_objective"] == min(o for o, _ in scored) <= first_objective
    assert base(plan).objective == pytest.approx(report["search"]["best_objective"])
    assert set(report["offsets"]) == set(BLOCK) and report["blocks"] == "importance"
    tables = allocator.tables()
    assert len(tables["composite_blocks"][1]) == BLOCKS and len(tables["composite_sublayers"][1]) == 2 * BLOCKS
    assert dict(map(tuple, tables["composite_knobs"][1])) == report["knobs"]


@pytest.mark.parametrize("kwargs, match", [
    ({"blocks": "first"}, "blocks='first'"), ({"between": "energy"}, "between='energy'"),
    ({"within": "bayes"}, "within='bayes'"), ({"k": 0}, "k=0"), ({"scale": -1}, "scale=-1"),
    ({"search_trials": -2}, "search_trials=-2"), ({"projection_offsets": True}, "needs search_trials"),
    ({"projection_offsets": True, "search_trials": 2, "within": "energy"}, "within='energy'"),
    ({"max_offset": 1.5}, "max_offset=1.5"),
    ({"search_trials": 3, "scale": 6.0}, "scale=6.0 is above max_scale=4.0"),
    ({"search_trials": 3, "between": "uniform"}, "no knob to search"),
])
def test_composite_bad_options_are_clear(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Composite(**kwargs)


def test_composite_infeasible_k_is_a_config_error(rng):
    mats = matrices(rng)
    with pytest.raises(ConfigError, match="k=2 must exceed"):
        Composite(blocks="last", k=2).check(mats, Budget({m.name: m.shape for m in mats}, 0.5))
