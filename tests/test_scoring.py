"""Scoring candidate plans on validation windows, and swapping plans in and out."""

import copy

import pytest
import torch
from torch import nn

from lrc.adapters import find_targets
from lrc.budget import Budget, uniform_rank
from lrc.evaluation import perplexity
from lrc.factorizers.svd import PlainSVD
from lrc.layers import LowRankLinear
from lrc.scoring import PlanScorer
from lrc.swap import apply_plan, plan_applied


@pytest.fixture
def setup(tiny):
    model = copy.deepcopy(tiny.model)
    targets = find_targets(model)
    decs = {t.name: PlainSVD().decompose(model.get_submodule(t.name).weight) for t in targets}
    windows = torch.randint(3, 256, (5, 32), generator=torch.Generator().manual_seed(1))
    budget = Budget({t.name: t.shape for t in targets}, 0.4)
    return model, targets, decs, windows, budget


def test_dense_plan_scores_the_dense_model(setup):
    model, targets, decs, windows, budget = setup
    scorer = PlanScorer(model, targets, decs, windows, budget, batch_size=2, kl_weight=1.0)
    dense_plan = {t.name: min(t.shape) for t in targets}
    score = scorer(dense_plan, trial=0)
    assert score.kl == pytest.approx(0.0, abs=1e-6)
    assert score.ppl == pytest.approx(perplexity(model, windows, batch_size=2), rel=1e-5)
    assert score.objective == pytest.approx(score.ppl + score.kl)


def test_scored_plan_equals_the_permanently_applied_plan_and_is_undone(setup):
    model, targets, decs, windows, budget = setup
    before = model(input_ids=windows).logits.detach()
    plan = {t.name: uniform_rank(t.shape, 0.4) for t in targets}
    scorer = PlanScorer(model, targets, decs, windows, budget, batch_size=2, kl_weight=0.5)
    score = scorer(plan, trial=3, note="x")
    assert score.kl > 0 and score.objective == pytest.approx(score.ppl + 0.5 * score.kl)
    # restored: plain linears again, same outputs
    assert all(type(model.get_submodule(t.name)) is nn.Linear for t in targets)
    torch.testing.assert_close(model(input_ids=windows).logits, before)
    row = scorer.trials[0]
    assert row["trial"] == 3 and row["note"] == "x"  # the allocator numbers its trials and row["ppl"] == score.ppl
    assert row["removed_fraction"] == pytest.approx(budget.removed_fraction(plan))

    compressed = copy.deepcopy(model)
    apply_plan(compressed, targets, plan, lambda n: decs[n], dict(decs))
    assert isinstance(compressed.get_submodule(targets[0].name), LowRankLinear)
    assert score.ppl == pytest.approx(perplexity(compressed, windows, batch_size=2), rel=1e-5)


def test_plan_applied_restores_the_model_after_an_error(setup):
    model, targets, decs, windows, budget = setup
    plan = {t.name: 2 for t in targets}
    with pytest.raises(RuntimeError, match="boom"), plan_applied(model, targets, plan, decs):
        assert isinstance(model.get_submodule(targets[0].name), LowRankLinear)
        raise RuntimeError("boom")
    assert all(type(model.get_submodule(t.name)) is nn.Linear for t in targets)
