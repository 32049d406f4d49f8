import pytest
import torch

from lrc.errors import ConfigError
from lrc.model.adapters import find_targets
from lrc.stats.cache import StatisticsCache
from lrc.stats.collect import collect_statistics, for_target
from lrc.stats.hooks import sublayer_cosine
from lrc.stats.types import InputStatistics


def test_gram_equals_inputs_outer_product(tiny):
    model = tiny.model
    targets = find_targets(model)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    inputs = captured_inputs(model, targets, windows)
    stats = collect_statistics(model, targets, windows, {"gram"}, batch_size=2)
    assert set(stats) == set(inputs)
    # one Gram per shared input: q/k/v share, gate/up share, o and down alone -> 4 per block
    assert len(inputs) == 4 * model.config.num_hidden_layers
    for g, X in inputs.items():
        assert stats[g].tokens == 48
        torch.testing.assert_close(stats[g].gram, X.T @ X, rtol=1e-5, atol=1e-4)


def test_hooks_removed_even_on_failure(tiny):
    model = tiny.model
    targets = find_targets(model)
    with pytest.raises(IndexError):
        collect_statistics(model, targets, torch.full((1, 4), 10_000), {"gram"})  # token id out of range
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(IndexError):
        collect_statistics(model, targets, torch.full((1, 4), 10_000), {"cosine"})
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_unknown_kind_is_clear(tiny):
    with pytest.raises(ConfigError, match="unknown statistics kinds"):
        collect_statistics(tiny.model, find_targets(tiny.model), torch.zeros(1, 4, dtype=torch.long), {"hessian"})


def test_cache_roundtrip_per_kind_and_corruption(tmp_path):
    cache = StatisticsCache(tmp_path)
    calls = []

    def compute(kinds):
        calls.append(sorted(kinds))
        out = {"a.q": InputStatistics(tokens=7)}
        if "gram" in kinds:
            out["a.q"].gram = torch.eye(3, dtype=torch.float64)
        if "mean_abs" in kinds:
            out["a.q"].mean_abs = torch.ones(3, dtype=torch.float64)
        return out

    base = {"model": "m"}
    got, cached = cache.get_or_compute(base, frozenset({"gram"}), compute)
    assert not cached and calls == [["gram"]]
    # a second run needing gram + mean_abs computes only mean_abs
    got, cached = cache.get_or_compute(base, frozenset({"gram", "mean_abs"}), compute)
    assert cached == {"gram"} and calls[-1] == ["mean_abs"]
    assert got["a.q"].tokens == 7 and torch.equal(got["a.q"].gram, torch.eye(3, dtype=torch.float64))
    assert torch.equal(got["a.q"].mean_abs, torch.ones(3, dtype=torch.float64))
    got, cached = cache.get_or_compute(base, frozenset({"gram", "mean_abs"}), compute)
    assert cached == {"gram", "mean_abs"} and len(calls) == 2
    # a truncated file is ignored and recomputed, never read half-written
    for path in (tmp_path / "stats").glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:40])
    got, cached = cache.get_or_compute(base, frozenset({"gram"}), compute)
    assert not cached and calls[-1] == ["gram"]
    assert not list(tmp_path.rglob(".*tmp-*"))


def captured_inputs(model, targets, windows, batch_size=2):
    """Every target group's inputs (T x n, float64) in token order, captured independently."""
    captured = {}

    def capture(name):
        def hook(module, args):
            captured.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return hook

    groups = sorted({t.group for t in targets})
    handles = [model.get_submodule(g).register_forward_pre_hook(capture(g)) for g in groups]
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {g: torch.cat(v) for g, v in captured.items()}


def test_input_kinds_match_hand_computation(tiny):
    model = tiny.model
    targets = find_targets(model)
    windows = torch.randint(0, 256, (6, 10), generator=torch.Generator().manual_seed(1))
    inputs = captured_inputs(model, targets, windows)
    stats = collect_statistics(model, targets, windows, {"gram", "mean_abs", "mean", "pooled_cov:4"}, batch_size=4)
    for group, X in inputs.items():
        s = stats[group]
        torch.testing.assert_close(s.gram, X.T @ X, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(s.mean_abs, X.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.mean, X.mean(0), rtol=1e-5, atol=1e-6)
        # pooled: the mean of the 4 per-group sample covariances (60 tokens -> groups of 15)
        by_hand = torch.stack([torch.cov(X[i * 15:(i + 1) * 15].T) for i in range(4)]).mean(0)
        torch.testing.assert_close(s.pooled_cov, by_hand, rtol=1e-4, atol=1e-5)


def test_pooled_groups_of_unequal_size(tiny):
    model = tiny.model
    targets = find_targets(model)[:1]
    windows = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    X = captured_inputs(model, targets, windows)[targets[0].group]
    stats = collect_statistics(model, targets, windows, {"pooled_cov:3"})
    bounds = [0, 3, 6, 10]
    by_hand = torch.stack([torch.cov(X[a:b].T) for a, b in zip(bounds, bounds[1:], strict=False)]).mean(0)
    torch.testing.assert_close(stats[targets[0].group].pooled_cov, by_hand, rtol=1e-4, atol=1e-5)


def test_fisher_rows_equal_squared_gradients(tiny):
    model = tiny.model
    targets = find_targets(model)
    windows = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(3))
    stats = collect_statistics(model, targets, windows, {"fisher"}, batch_size=2)
    expected = {t.name: torch.zeros(t.shape[0], dtype=torch.float64) for t in targets}
    for i in (0, 2):
        model.zero_grad()
        batch = windows[i:i + 2]
        model(input_ids=batch, labels=batch).loss.backward()
        for t in targets:
            expected[t.name] += model.get_submodule(t.name).weight.grad.double().pow(2).sum(1)
    model.zero_grad()
    for t in targets:
        torch.testing.assert_close(for_target(stats, t).fisher, expected[t.name], rtol=1e-5, atol=1e-12)
    # no gradient is left behind and requires_grad is restored
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_for_target_combines_shared_input_and_own_fisher(tiny):
    model = tiny.model
    targets = find_targets(model)
    windows = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    stats = collect_statistics(model, targets, windows, {"gram", "fisher"})
    q, k = (t for t in targets if t.block == 0 and t.kind in ("q_proj", "k_proj"))
    sq, sk = for_target(stats, q), for_target(stats, k)
    assert sq.gram is sk.gram and sq.derived is sk.derived  # one input, one Gram, shared derived data
    assert sq.fisher.shape == (q.shape[0],) and sk.fisher.shape == (k.shape[0],)
    assert not torch.equal(sq.fisher[: k.shape[0]], sk.fisher)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def test_sublayer_cosine_matches_hidden_states(tiny):
    """Independent check through the residual stream: block input h_i, MLP input x = h_i + attn(h_i),
    block output h_{i+1} = x + mlp(x)."""
    model = tiny.model
    targets = find_targets(model)
    windows = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    mlp_inputs = []
    handles = [block.post_attention_layernorm.register_forward_pre_hook(lambda m, a: mlp_inputs.append(a[0]))
               for block in model.model.layers]
    try:
        with torch.no_grad():
            hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    cos = sublayer_cosine(collect_statistics(model, targets, windows, {"cosine", "gram"}, batch_size=2))
    assert set(cos) == {(b, s) for b in range(2) for s in ("attn", "mlp")}
    h0, x0, h1 = hidden[0], mlp_inputs[0], hidden[1]  # hidden[-1] has the final norm applied
    assert cos[(0, "attn")] == pytest.approx((_cos(h0, x0 - h0), _cos(h0, x0)), abs=1e-5)
    assert cos[(0, "mlp")] == pytest.approx((_cos(x0, h1 - x0), _cos(x0, h1)), abs=1e-5)
    x1 = mlp_inputs[1]
    assert cos[(1, "attn")] == pytest.approx((_cos(h1, x1 - h1), _cos(h1, x1)), abs=1e-5)


def test_cache_ignores_a_file_whose_content_changed(tmp_path):
    cache = StatisticsCache(tmp_path)
    stats = {"g": InputStatistics(tokens=3, gram=torch.eye(4, dtype=torch.float64))}
    cache.keep("k" * 32, stats)
    path = cache.path("k" * 32)
    assert cache.load("k" * 32)["g"].gram.equal(torch.eye(4, dtype=torch.float64))
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # flip bits inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))
    assert cache.load("k" * 32) is None  # the content hash no longer matches


@pytest.mark.parametrize("n", [100, 513, 600, 1000])
def test_strip_gram_equals_the_full_product(n, rng):
    from lrc.gram import add_gram, symmetric

    x = torch.randn(300, n, generator=rng)
    acc = torch.zeros(n, n, dtype=torch.float64)
    add_gram(acc, x[:150])
    add_gram(acc, x[150:])
    reference = x.double().T @ x.double()
    torch.testing.assert_close(symmetric(acc), reference, rtol=1e-5, atol=1e-3)
    assert torch.equal(symmetric(acc), symmetric(acc).T)


def test_json_cache_logs_a_corrupt_entry_and_recomputes(tmp_path, caplog):
    from lrc.files import JsonCache

    cache = JsonCache(tmp_path, "dense")
    assert cache.load("k") is None and not caplog.records  # absent: quietly None
    cache.save("k", {"ppl": 1.0})
    (tmp_path / "dense" / "k.json").write_text("{broken")
    with caplog.at_level("WARNING", logger="lrc.files"):
        assert cache.load("k") is None
    assert "ignoring unreadable" in caplog.text and "k.json" in caplog.text
