import torch

from lrc.model.layers import LowRankLinear, replace_module


def test_low_rank_linear_equals_dense_product(rng):
    B, A, b = torch.randn(7, 3, generator=rng), torch.randn(3, 5, generator=rng), torch.randn(7, generator=rng)
    layer = LowRankLinear.from_factors(B, A, b)
    x = torch.randn(4, 2, 5, generator=rng)
    torch.testing.assert_close(layer(x), x @ (B @ A).T + b)
    torch.testing.assert_close(layer.dense_weight(), B @ A)
    assert "rank=3" in repr(layer)
    assert sum(p.numel() for p in layer.parameters()) == 3 * (7 + 5) + 7


def test_low_rank_linear_without_bias(rng):
    B, A = torch.randn(4, 2, generator=rng), torch.randn(2, 6, generator=rng)
    layer = LowRankLinear.from_factors(B, A)
    assert layer.second.bias is None
    x = torch.randn(3, 6, generator=rng)
    torch.testing.assert_close(layer(x), x @ A.T @ B.T)


def test_replace_module_swaps_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    new = LowRankLinear(4, 2, 1)
    old = replace_module(model, "1.0", new)
    assert isinstance(old, torch.nn.Linear) and model[1][0] is new
