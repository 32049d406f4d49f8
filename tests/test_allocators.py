"""Contract tests shared by every allocator."""

import pytest
import torch

from lrc.allocators.base import MatrixInfo
from lrc.allocators.uniform import Uniform
from lrc.budget import Budget, break_even_rank, check_plan, uniform_rank

ALLOCATORS = {"uniform": Uniform}

# One GQA decoder block (hidden 96, 6 q heads / 2 kv heads of 16, MLP 256), four blocks.
BLOCK = {"q_proj": ("attn", (96, 96)), "k_proj": ("attn", (32, 96)), "v_proj": ("attn", (32, 96)),
         "o_proj": ("attn", (96, 96)), "gate_proj": ("mlp", (256, 96)), "up_proj": ("mlp", (256, 96)),
         "down_proj": ("mlp", (96, 256))}


def matrices(gen: torch.Generator) -> list[MatrixInfo]:
    out = []
    for block in range(4):
        for kind, (sub, shape) in BLOCK.items():
            spectrum = torch.sort(torch.rand(min(shape), generator=gen, dtype=torch.float64), descending=True).values
            out.append(MatrixInfo(f"layers.{block}.{kind}", shape, block, sub, kind, spectrum))
    return out


@pytest.mark.parametrize("name", ALLOCATORS)
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.6, 0.8])
def test_plan_meets_budget_exactly(name, ratio, rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, ratio)
    plan = ALLOCATORS[name]().allocate(mats, budget)
    check_plan(plan, budget)  # never over, under by less than one rank step per matrix
    for m in mats:
        assert 1 <= plan[m.name] <= break_even_rank(m.shape)


@pytest.mark.parametrize("name", ALLOCATORS)
def test_deterministic(name, rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.3)
    assert ALLOCATORS[name]().allocate(mats, budget) == ALLOCATORS[name]().allocate(mats, budget)


def test_uniform_equals_closed_form(rng):
    mats = matrices(rng)
    budget = Budget({m.name: m.shape for m in mats}, 0.35)
    plan = Uniform().allocate(mats, budget)
    assert plan == {m.name: int((1 - 0.35) * m.shape[0] * m.shape[1] // (m.shape[0] + m.shape[1])) for m in mats}
    assert plan["layers.0.k_proj"] == uniform_rank((32, 96), 0.35) == 15
