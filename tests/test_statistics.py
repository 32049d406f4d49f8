import pytest
import torch

from lrc.adapters import find_targets
from lrc.cache import StatisticsCache
from lrc.factorizers.base import InputStatistics
from lrc.statistics import collect_statistics


def test_gram_equals_inputs_outer_product(tiny):
    model = tiny.model
    targets = find_targets(model)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    captured = {}

    def capture(name):
        def hook(module, args):
            captured.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return hook

    groups = sorted({t.group for t in targets})
    handles = [model.get_submodule(g).register_forward_pre_hook(capture(g)) for g in groups]
    try:
        stats = collect_statistics(model, targets, windows, {"gram"}, batch_size=2)
    finally:
        for h in handles:
            h.remove()
    assert set(stats) == set(groups)
    # one Gram per shared input: q/k/v share, gate/up share, o and down alone -> 4 per block
    assert len(groups) == 4 * model.config.num_hidden_layers
    for g in groups:
        X = torch.cat(captured[g])
        assert stats[g].tokens == 48
        torch.testing.assert_close(stats[g].gram, X.T @ X, rtol=1e-5, atol=1e-4)


def test_hooks_removed_even_on_failure(tiny):
    model = tiny.model
    targets = find_targets(model)
    with pytest.raises(Exception):
        collect_statistics(model, targets, torch.full((1, 4), 10_000), {"gram"})  # token id out of range
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_unknown_kind_is_clear(tiny):
    with pytest.raises(ValueError, match="unknown statistics kinds"):
        collect_statistics(tiny.model, find_targets(tiny.model), torch.zeros(1, 4, dtype=torch.long), {"hessian"})


def test_cache_roundtrip_and_corruption(tmp_path):
    cache = StatisticsCache(tmp_path)
    stats = {"a.q": InputStatistics(tokens=7, gram=torch.eye(3, dtype=torch.float64))}
    calls = []

    def compute():
        calls.append(1)
        return stats

    got, cached = cache.get_or_compute("k1", compute)
    assert not cached and len(calls) == 1
    got, cached = cache.get_or_compute("k1", compute)
    assert cached and len(calls) == 1
    assert got["a.q"].tokens == 7 and torch.equal(got["a.q"].gram, stats["a.q"].gram)
    # a truncated file is ignored and recomputed, never read half-written
    path = cache.path("k1")
    path.write_bytes(path.read_bytes()[:40])
    got, cached = cache.get_or_compute("k1", compute)
    assert not cached and len(calls) == 2
    assert not list(tmp_path.rglob(".*tmp-*"))
