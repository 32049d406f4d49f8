import math

import pytest

from lrc.budget import Budget, break_even_rank, check_plan, check_ratio, stored_params, uniform_rank
from lrc.errors import BudgetError, ConfigError

# SmolLM2-135M's seven projection shapes (out, in): hidden 576, 9 q heads / 3 kv heads of 64, MLP 1536.
SMOLLM2 = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
           "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def test_uniform_rank_closed_form_by_hand():
    # r = floor(0.8 m n / (m + n)), computed by hand for the seven shapes
    expected = {"q_proj": 230, "k_proj": 115, "v_proj": 115, "o_proj": 230,
                "gate_proj": 335, "up_proj": 335, "down_proj": 335}
    for kind, shape in SMOLLM2.items():
        assert uniform_rank(shape, 0.2) == expected[kind], kind


def test_smollm2_hand_count_meets_budget():
    shapes = {f"model.layers.{i}.{k}": s for i in range(30) for k, s in SMOLLM2.items()}
    budget = Budget(shapes, 0.2)
    per_block = 576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3
    assert budget.params_before == 30 * per_block == 106_168_320
    plan = {name: uniform_rank(shape, 0.2) for name, shape in shapes.items()}
    # by hand: 230*1152*2 + 115*768*2 + 335*2112*3 per block
    assert budget.params_after(plan) == 30 * (230 * 1152 * 2 + 115 * 768 * 2 + 335 * 2112 * 3)
    check_plan(plan, budget)
    assert 0.2 <= budget.removed_fraction(plan) < 0.2 + budget.slack / budget.params_before


def test_break_even_and_dense_accounting():
    assert break_even_rank((576, 576)) == 287  # 288 * 1152 == 576 * 576 would not save anything
    assert stored_params((576, 576), 288) == 576 * 576
    assert stored_params((576, 576), 10) == 10 * 1152


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "abc", float("nan")])
def test_bad_ratio_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="ratio"):
        check_ratio(bad)


def test_check_plan_rejects_over_and_far_under_budget():
    shapes = {"a": (64, 64), "b": (32, 64)}
    budget = Budget(shapes, 0.5)
    good = {n: uniform_rank(s, 0.5) for n, s in shapes.items()}
    check_plan(good, budget)
    with pytest.raises(BudgetError, match="over the budget"):
        check_plan({"a": 30, "b": 21}, budget)
    with pytest.raises(BudgetError, match="under the budget"):
        check_plan({"a": 1, "b": 1}, budget)
    with pytest.raises(BudgetError, match="outside"):
        check_plan({"a": 0, "b": 1}, budget)
    with pytest.raises(BudgetError, match="missing"):
        check_plan({"a": 3}, budget)


def test_removed_fraction_definition_not_inverted():
    budget = Budget({"w": (100, 100)}, 0.25)
    plan = {"w": uniform_rank((100, 100), 0.25)}  # floor(0.75 * 50) = 37
    assert plan["w"] == 37
    assert math.isclose(budget.removed_fraction(plan), 1 - 37 * 200 / 10_000)
