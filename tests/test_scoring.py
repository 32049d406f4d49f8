"""Scoring candidate plans on validation windows, and swapping plans in and out."""

import copy
import math

import pytest
import torch
from torch import nn

from lrc.allocators.base import Validation
from lrc.budget import Budget, uniform_rank
from lrc.compress.scoring import PlanScorer, ScoreMemo
from lrc.compress.swap import apply_plan, plan_applied
from lrc.eval.perplexity import perplexity
from lrc.factorizers.svd import PlainSVD
from lrc.model.adapters import find_targets
from lrc.model.layers import LowRankLinear


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
    scorer = PlanScorer(model, targets, decs, windows, budget, Validation(seqlen=32, batch_size=2, kl_weight=1.0))
    dense_plan = {t.name: min(t.shape) for t in targets}
    score = scorer(dense_plan, trial=0)
    assert score.kl == pytest.approx(0.0, abs=1e-6)
    assert score.ppl == pytest.approx(perplexity(model, windows, batch_size=2), rel=1e-5)
    assert score.objective == pytest.approx(score.ppl + score.kl)


def test_scored_plan_equals_the_permanently_applied_plan_and_is_undone(setup):
    model, targets, decs, windows, budget = setup
    before = model(input_ids=windows).logits.detach()
    plan = {t.name: uniform_rank(t.shape, 0.4) for t in targets}
    scorer = PlanScorer(model, targets, decs, windows, budget, Validation(seqlen=32, batch_size=2, kl_weight=0.5))
    score = scorer(plan, trial=3, note="x")
    assert score.kl > 0 and score.objective == pytest.approx(score.ppl + 0.5 * score.kl)
    # restored: plain linears again, same outputs
    assert all(type(model.get_submodule(t.name)) is nn.Linear for t in targets)
    torch.testing.assert_close(model(input_ids=windows).logits, before)
    row = scorer.trials[0]
    assert row["trial"] == 3 and row["note"] == "x"  # the allocator numbers its trials
    assert (row["objective"], row["ppl"], row["kl"]) == (score.objective, score.ppl, score.kl)
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


def test_bolaco_objective_equals_an_independent_computation(setup):
    """Bolaco's lib/evaluator.py: ppl + 1e-3 * mean over windows of kl_div(log p_dense, p_compressed,
    'batchmean') on one window at a time (KL summed over every position and the vocabulary)."""
    model, targets, decs, windows, budget = setup
    plan = {t.name: uniform_rank(t.shape, 0.4) for t in targets}
    with torch.no_grad():
        dense_logits = model(input_ids=windows).logits.double()
        compressed = copy.deepcopy(model)
        apply_plan(compressed, targets, plan, lambda n: decs[n], dict(decs))
        logits = compressed(input_ids=windows).logits.double()
    kls = [torch.nn.functional.kl_div(torch.log_softmax(dense_logits[i:i + 1], -1), torch.softmax(logits[i:i + 1], -1),
                                      reduction="batchmean") for i in range(windows.shape[0])]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    expected_kl = float(torch.stack(kls).mean())
    expected = float(nll.exp()) + 1e-3 * expected_kl
    validation = Validation(seqlen=windows.shape[1], batch_size=2, kl_weight=1e-3, kl_reduction="window_sum")
    score = PlanScorer(model, targets, decs, windows, budget, validation)(plan)
    assert score.kl == pytest.approx(expected_kl, rel=1e-4)
    assert score.objective == pytest.approx(expected, rel=1e-5)
    log_score = PlanScorer(model, targets, decs, windows, budget,
                           Validation(seqlen=windows.shape[1], batch_size=2, kl_weight=1e-3, kl_reduction="window_sum",
                                      objective="log"))(plan)
    assert log_score.objective == pytest.approx(math.log(expected), rel=1e-6)


def test_score_memo_never_evaluates_a_plan_twice(setup, tmp_path, monkeypatch):
    model, targets, decs, windows, budget = setup
    plan = {t.name: uniform_rank(t.shape, 0.4) for t in targets}
    validation = Validation(seqlen=32, batch_size=2)
    first = PlanScorer(model, targets, decs, windows, budget, validation, memo=ScoreMemo(tmp_path / "m"))(plan)
    again = PlanScorer(model, targets, decs, windows, budget, validation, memo=ScoreMemo(tmp_path / "m"))
    monkeypatch.setattr(again, "evaluate", lambda model: pytest.fail("a memoised plan was evaluated again"))
    assert again(plan) == first
    other = dict(plan, **{targets[0].name: 1})
    with pytest.raises(pytest.fail.Exception):
        again(other)  # a new plan is evaluated


def test_score_memo_keys_tell_setups_apart():
    windows = torch.arange(64).view(4, 16)
    identity = {"model": "m", "factorizer": {"name": "SVDLLM"}}
    key = ScoreMemo.key(identity, windows)
    assert key == ScoreMemo.key(dict(identity), windows.clone())
    assert key != ScoreMemo.key(identity, windows.view(2, 32))  # the same tokens cut into other windows
    assert key != ScoreMemo.key({**identity, "factorizer": {"name": "ASVD"}}, windows)
    assert key != ScoreMemo.key(identity, windows + 1)
