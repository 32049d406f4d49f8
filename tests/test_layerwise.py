"""Layer-wise mode: one block at a time gives the whole-model result; compressed inputs differ."""

import copy
from contextlib import contextmanager

import pytest
import torch
from conftest import spec

from lrc import pipeline
from lrc.allocators.bayes import Bayes
from lrc.allocators.energy import Energy
from lrc.allocators.mgaa import MGAA
from lrc.allocators.uniform import Uniform
from lrc.budget import is_low_rank
from lrc.compress.layerwise import LayerwiseOptions
from lrc.compress.stream import BlockStream
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.errors import ConfigError
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.factorizers.feature_pca import FeaturePCA
from lrc.factorizers.fwsvd import FWSVD
from lrc.factorizers.svd import PlainSVD
from lrc.factorizers.svdllm import SVDLLM
from lrc.model.adapters import find_targets
from lrc.model.blocks import ResidentBlocks
from lrc.model.layers import LowRankLinear
from lrc.model.loading import LoadedModel, tiny_random
from lrc.stats.collect import collect_statistics

LAYERWISE = LayerwiseOptions(enabled=True)


class CountedVisits(ResidentBlocks):
    """Host-resident blocks that note the index of every block's visit to the device."""

    def __init__(self) -> None:
        super().__init__()
        self.visits: list[int] = []

    def visit(self, index, block, device):
        self.visits.append(index)
        return super().visit(index, block, device)


def compress(tiny, cache, allocator, factorizer=None, layerwise=None, ratio=0.4, model_type="llama", home=None):
    base = tiny if model_type == "llama" else tiny_random(device="cpu", model_type=model_type, num_hidden_layers=3)
    loaded = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.identity, blocks=home or ResidentBlocks())
    calibration = Calibration(EmbeddedText(), nsamples=6, seqlen=64, batch_size=4)
    bench = [PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=64, max_windows=8)]
    outcome = pipeline.compress_and_evaluate(loaded, spec(factorizer or SVDLLM(), allocator, ratio, calibration, bench,
                                             cache_dir=cache, measure_forward=False, layerwise=layerwise))
    return outcome, loaded.model


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("make_allocator", [Uniform, MGAA, Energy, lambda: MGAA(inner="uniform")],
                         ids=["uniform", "mgaa", "energy", "mgaa-inner-uniform"])
def test_layerwise_equals_whole_model(tiny, tmp_path, make_allocator):
    whole, whole_model = compress(tiny, tmp_path / "a", make_allocator())
    home = CountedVisits()
    layer, layer_model = compress(tiny, tmp_path / "b", make_allocator(), layerwise=LAYERWISE, home=home)
    assert layer.diagnostics["mode"] == "layerwise" and whole.diagnostics["mode"] == "whole-model"
    assert layer.ranks == whole.ranks
    assert layer.metrics["ppl/embedded"] == pytest.approx(whole.metrics["ppl/embedded"], rel=1e-5)
    ids = torch.arange(40)[None] % 200
    torch.testing.assert_close(logits(layer_model, ids), logits(whole_model, ids), rtol=1e-4, atol=1e-4)
    # the plan depends on data for all but uniform: two streaming passes over the blocks (statistics and
    # spectra, then factorization), but only the first runs the calibration forward; the second reads
    # the statistics it cached. Uniform plans first and factorizes in one pass, which runs the forward.
    assert home.visits == [0, 1] * (1 if make_allocator is Uniform else 2)
    assert layer.diagnostics["calibration_passes"] == 1


def test_layerwise_statistics_equal_whole_model_statistics(tiny):
    model = copy.deepcopy(tiny.model)
    targets = find_targets(model)
    windows = torch.randint(3, 250, (5, 32), generator=torch.Generator().manual_seed(0))
    kinds = frozenset({"gram", "mean_abs", "pooled_cov:3", "cosine"})
    whole = collect_statistics(model, targets, windows, kinds, batch_size=2)
    from lrc.stats.hooks import StatisticsHooks
    stream = BlockStream(model, windows, 2, torch.device("cpu"))
    for i, block in enumerate(stream.blocks):
        hooks = StatisticsHooks(model, [t for t in targets if t.block == i], kinds, windows.numel(),
                                torch.device("cpu"), blocks=[i])
        with ResidentBlocks().visit(i, block, torch.device("cpu")):
            stream.run(i, hooks)
        for key, s in hooks.finish().items():
            for field in ("gram", "mean_abs", "pooled_cov", "cosine"):
                if getattr(whole[key], field) is not None:
                    torch.testing.assert_close(getattr(s, field), getattr(whole[key], field), rtol=1e-9, atol=1e-9)
            assert s.tokens == whole[key].tokens


def test_layerwise_on_gemma3_per_layer_type_arguments(tmp_path):
    """Gemma 3 hands sliding-window and global layers different masks and rotary tables."""
    whole, _ = compress(None, tmp_path / "a", Uniform(), model_type="gemma3_text")
    layer, _ = compress(None, tmp_path / "b", Uniform(), layerwise=LAYERWISE, model_type="gemma3_text")
    assert layer.metrics["ppl/embedded"] == pytest.approx(whole.metrics["ppl/embedded"], rel=1e-5)


def test_compressed_inputs_change_the_statistics_and_are_cached_apart(tiny, tmp_path):
    cache = tmp_path / "cache"
    dense_inputs, _ = compress(tiny, cache, Uniform(), layerwise=LAYERWISE)
    compressed = LayerwiseOptions(enabled=True, compressed_inputs=True)
    first, model = compress(tiny, cache, Uniform(), layerwise=compressed)
    assert first.diagnostics["statistics_computed"] == ["gram"]  # not taken from the dense-input cache
    assert first.ranks == dense_inputs.ranks
    # block 0 sees the same inputs; later blocks see the compressed model's activations
    b0 = [n for n in first.diagnostics["truncation_error"] if ".0." in n]
    b1 = [n for n in first.diagnostics["truncation_error"] if ".1." in n]
    for name in b0:
        assert first.diagnostics["truncation_error"][name] == pytest.approx(
            dense_inputs.diagnostics["truncation_error"][name], rel=1e-9)
    assert any(first.diagnostics["truncation_error"][n] != pytest.approx(
        dense_inputs.diagnostics["truncation_error"][n], rel=1e-6) for n in b1)
    again, _ = compress(tiny, cache, Uniform(), layerwise=compressed)
    assert again.diagnostics["statistics_cached"] == ["gram"] and again.diagnostics["calibration_passes"] == 0
    assert again.metrics == first.metrics


def test_compressed_inputs_with_a_global_allocator_plans_on_dense_statistics(tiny, tmp_path):
    cache = tmp_path / "cache"
    dense_inputs, _ = compress(tiny, cache, MGAA(), layerwise=LAYERWISE)
    compressed, _ = compress(tiny, cache, MGAA(), layerwise=LayerwiseOptions(enabled=True, compressed_inputs=True))
    assert compressed.ranks == dense_inputs.ranks  # the plan comes from the dense pass (cached)
    assert compressed.diagnostics["calibration_passes"] == 1  # the compressed-input pass only
    assert compressed.metrics != dense_inputs.metrics


def test_layerwise_search_allocator_scores_plans(tiny, tmp_path):
    whole, _ = compress(tiny, tmp_path / "a", Bayes(n_trials=3, seed=0))
    layer, _ = compress(tiny, tmp_path / "b", Bayes(n_trials=3, seed=0), layerwise=LAYERWISE)
    assert layer.ranks == whole.ranks
    assert [t["objective"] for t in layer.trials] == pytest.approx([t["objective"] for t in whole.trials], rel=1e-5)


def test_composite_search_gives_the_same_plan_in_both_modes(tiny, tmp_path):
    from lrc.allocators.composite import Composite

    def composite():
        return Composite(blocks="last", search_trials=3, projection_offsets=True,
                         validation={"nsamples": 2, "seqlen": 32, "batch_size": 2})

    whole, _ = compress(tiny, tmp_path / "a", composite(), factorizer=SVDLLM(shrinkage=0.1))
    layer, _ = compress(tiny, tmp_path / "b", composite(), factorizer=SVDLLM(shrinkage=0.1), layerwise=LAYERWISE)
    assert layer.ranks == whole.ranks and len(whole.trials) == 3
    assert [t["objective"] for t in layer.trials] == pytest.approx([t["objective"] for t in whole.trials], rel=1e-5)
    allocation = whole.diagnostics["allocation"]
    assert allocation["blocks"] == "last" and allocation["knob/k"] in range(1, 3)
    assert "composite_blocks" in whole.tables


@pytest.mark.parametrize("factorizer", [PlainSVD, FeaturePCA], ids=["svd", "feature_pca"])
def test_layerwise_with_other_factorizers(tiny, tmp_path, factorizer):
    whole, _ = compress(tiny, tmp_path / "a", Energy(), factorizer=factorizer())
    layer, _ = compress(tiny, tmp_path / "b", Energy(), factorizer=factorizer(), layerwise=LAYERWISE)
    assert layer.ranks == whole.ranks
    assert layer.metrics["ppl/embedded"] == pytest.approx(whole.metrics["ppl/embedded"], rel=1e-5)


def test_layerwise_rejects_fisher_before_heavy_work(tiny, tmp_path):
    with pytest.raises(ConfigError, match="fisher.*whole model"):
        compress(tiny, tmp_path, Uniform(), factorizer=FWSVD(), layerwise=LAYERWISE)
    assert not (tmp_path / "stats").exists()


def streamed_tiny(offload, **extra):
    from lrc.model.streamed import random_streamed

    return random_streamed(offload, seed=3, vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, **extra)


def test_streamed_blocks_give_the_resident_result_and_stay_out_of_memory(tmp_path):
    """A model whose blocks are materialised one at a time (and offloaded once compressed)
    compresses exactly like the same weights held in memory."""
    calibration = Calibration(EmbeddedText(), nsamples=6, seqlen=64, batch_size=4)
    streamed = streamed_tiny(tmp_path / "offload")
    resident = streamed_tiny(tmp_path / "unused")
    resident.blocks.materialize(resident.model.model.layers)  # same weights, in memory for good
    resident.blocks = ResidentBlocks()
    outcomes = [pipeline.compress_and_evaluate(loaded, spec(SVDLLM(), MGAA(), 0.4, calibration, [],
                                               cache_dir=tmp_path / name, measure_forward=True, layerwise=LAYERWISE))
                for name, loaded in (("s", streamed), ("r", resident))]
    assert outcomes[0].ranks == outcomes[1].ranks
    assert outcomes[0].diagnostics["truncation_error"] == pytest.approx(outcomes[1].diagnostics["truncation_error"])
    assert all(p.is_meta for p in streamed.model.model.layers.parameters())  # nothing left in memory
    assert sorted(p.name for p in (tmp_path / "offload").iterdir()) == [f"block-000{i}.safetensors" for i in range(3)]
    streamed.blocks.materialize(streamed.model.model.layers)
    ids = torch.arange(50)[None] % 250
    torch.testing.assert_close(logits(streamed.model, ids), logits(resident.model, ids))
    assert outcomes[0].params == outcomes[1].params


def test_streamed_model_needs_layerwise_and_no_whole_model_work(tmp_path):
    calibration = Calibration(EmbeddedText(), nsamples=2, seqlen=32)
    loaded = streamed_tiny(tmp_path / "offload")
    bench = [PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=64, max_windows=2)]
    for layerwise, benchmarks, allocator, message in [
            (None, [], Uniform(), "layerwise.enabled=true"),
            (LAYERWISE, bench, Uniform(), "cannot be benchmarked whole"),
            (LAYERWISE, [], Bayes(n_trials=2), "scores plans on the whole model")]:
        with pytest.raises(ConfigError, match=message):
            pipeline.compress_and_evaluate(loaded, spec(SVDLLM(), allocator, 0.4, calibration, benchmarks,
                                           cache_dir=tmp_path, layerwise=layerwise))


def test_partial_layer_plan_collects_statistics_of_compressed_blocks_only(tmp_path):
    from lrc.allocators.ressvd_plc import ResSVDPLC

    base = tiny_random(device="cpu", num_hidden_layers=4)
    outcomes = {}
    for mode, layerwise in (("whole", None), ("layer", LAYERWISE)):
        loaded = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.identity)
        calibration = Calibration(EmbeddedText(), nsamples=4, seqlen=64)
        bench = [PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=64, max_windows=4)]
        outcomes[mode] = pipeline.compress_and_evaluate(loaded, spec(SVDLLM(), ResSVDPLC(k=2), 0.2, calibration, bench,
                                                        cache_dir=tmp_path / mode, layerwise=layerwise))
    assert outcomes["layer"].ranks == outcomes["whole"].ranks
    assert outcomes["layer"].metrics["ppl/embedded"] == pytest.approx(outcomes["whole"].metrics["ppl/embedded"],
                                                                     rel=1e-5)
    # one Gram file per block it needs: blocks 2 and 3 (the first two stay dense)
    assert len(list((tmp_path / "layer" / "stats").glob("*.safetensors"))) == 2


def test_warm_cache_needs_no_calibration_pass(tmp_path):
    """A second run finds every statistic it needs in the cache: no forward over the calibration
    set, even when its plan keeps the first blocks dense (no statistics were ever cached for them)."""
    from lrc.allocators.ressvd_plc import ResSVDPLC

    base = tiny_random(device="cpu", num_hidden_layers=4)
    calibration = Calibration(EmbeddedText(), nsamples=4, seqlen=64)
    passes = []
    for _ in range(2):
        loaded = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.identity)
        outcome = pipeline.compress_and_evaluate(loaded, spec(SVDLLM(), ResSVDPLC(k=2), 0.2, calibration, [],
                                                              cache_dir=tmp_path, layerwise=LAYERWISE))
        passes.append(outcome.diagnostics["calibration_passes"])
    assert passes == [1, 0]


class FailingFactorizer(SVDLLM):
    def __init__(self, fail_at: str) -> None:
        super().__init__()
        self.fail_at = fail_at

    def decompose(self, weight, stats=None, max_rank=None):
        if weight is self.fail_at:
            raise ConfigError("injected failure")
        return super().decompose(weight, stats, max_rank)


class RecordingHome(ResidentBlocks):
    """Notes every block that went to the device and every block that came back."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[int] = []
        self.back: list[int] = []

    @contextmanager
    def visit(self, index, block, device):
        self.out.append(index)
        try:
            with super().visit(index, block, device):
                yield block
        finally:
            self.back.append(index)


def test_a_failure_mid_pass_returns_the_visited_block_at_once(tiny, tmp_path):
    home = RecordingHome()
    loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.identity, blocks=home)
    factorizer = FailingFactorizer(fail_at=loaded.model.model.layers[1].mlp.down_proj.weight)
    calibration = Calibration(EmbeddedText(), nsamples=2, seqlen=32)
    try:
        pipeline.compress_and_evaluate(loaded, spec(factorizer, Uniform(), 0.4, calibration, [], cache_dir=tmp_path,
                                                    measure_forward=False, layerwise=LAYERWISE))
    except ConfigError as exc:  # checked while the error is in flight (its frames still alive)
        assert str(exc) == "injected failure"
        assert home.out == [0, 1] and home.back == [0, 1]  # block 1 came back before the error left the run
    else:
        pytest.fail("the injected failure did not surface")


UPDATES = [(SVDLLM, "local", False), (SVDLLM, "dense", True), (SVDLLM, "dense", False),
           (FeaturePCA, "local", False), (FeaturePCA, "dense", True)]


@pytest.mark.parametrize(("factorizer", "target", "compressed_inputs"), UPDATES,
                         ids=["svdllm local (SVD-LLM)", "svdllm dense", "svdllm dense, dense statistics",
                              "feature_pca local (bias re-fitted)", "feature_pca dense"])
def test_sequential_update_never_increases_a_linears_output_error(tiny, tmp_path, factorizer, target,
                                                                  compressed_inputs):
    options = LayerwiseOptions(enabled=True, compressed_inputs=compressed_inputs, sequential_update=True,
                               update_target=target)
    updated, model = compress(tiny, tmp_path, Uniform(), factorizer=factorizer(), layerwise=options, ratio=0.5)
    errors = updated.diagnostics["sequential_update"]
    assert set(errors) == {n for n, r in updated.ranks.items() if is_low_rank(updated.diagnostics["shapes"][n], r)}
    for before, after in errors.values():
        assert 0 <= after <= before * (1 + 1e-9)
    assert sum(a for _, a in errors.values()) < 0.99 * sum(b for b, _ in errors.values())  # and it helps
    plain, _ = compress(tiny, tmp_path, Uniform(), factorizer=factorizer(), ratio=0.5,
                        layerwise=LayerwiseOptions(enabled=True, compressed_inputs=compressed_inputs))
    assert plain.ranks == updated.ranks and "sequential_update" not in plain.diagnostics
    assert updated.params == plain.params  # the update changes values, never the parameter count


def test_local_update_keeps_the_dense_whitening_and_changes_only_second_factors(tiny, tmp_path):
    """SVD-LLM's released procedure: A from the dense model's whitening, B re-fitted on the
    compressed inputs; the first factors are those of the run without the update."""
    options = LayerwiseOptions(sequential_update=True)  # whole-model mode, dense statistics
    updated, model = compress(tiny, tmp_path / "a", Uniform(), layerwise=options, ratio=0.5)
    plain, dense_model = compress(tiny, tmp_path / "b", Uniform(), ratio=0.5)
    assert updated.ranks == plain.ranks and updated.diagnostics["statistics_computed"]
    low_rank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert low_rank
    for name in low_rank:
        a, b = model.get_submodule(name), dense_model.get_submodule(name)
        torch.testing.assert_close(a.first.weight, b.first.weight, rtol=0, atol=0)
        same = torch.allclose(a.second.weight, b.second.weight, rtol=1e-4, atol=1e-6)
        # the first block's inputs are the dense ones (nothing to re-fit); every later one's differ
        assert same == name.startswith("model.layers.0."), name


def test_local_update_is_a_no_op_where_the_whitening_saw_the_same_inputs(tiny, tmp_path):
    """With compressed-input statistics, SVD-LLM's whitened truncation is already the joint least
    squares optimum on those inputs, so re-fitting its second factor towards the same targets
    changes nothing: a check of both the closed form and the paired inputs."""
    options = LayerwiseOptions(enabled=True, compressed_inputs=True, sequential_update=True, update_target="local")
    updated, _ = compress(tiny, tmp_path, Uniform(), layerwise=options, ratio=0.5)
    errors = updated.diagnostics["sequential_update"]
    assert errors
    for before, after in errors.values():
        assert after == pytest.approx(before, rel=1e-3)


def test_sequential_update_error_matches_a_direct_computation(rng):
    """The closed form is the least-squares optimum for the second factor (and bias), and the error
    formula from sums equals the error computed token by token."""
    from lrc.compress.correction import PairedMoments, corrected_second_factor, output_error
    from lrc.model.layers import LowRankLinear

    m, n, r, T = 6, 8, 3, 50
    W, b0 = torch.randn(m, n, generator=rng, dtype=torch.float64), torch.randn(m, generator=rng, dtype=torch.float64)
    Xd = torch.randn(T, n, generator=rng, dtype=torch.float64)
    Xc = Xd + 0.3 * torch.randn(T, n, generator=rng, dtype=torch.float64)  # the compressed model's inputs
    A = torch.randn(r, n, generator=rng, dtype=torch.float64)
    moments = PairedMoments.zeros(n, torch.device("cpu"))
    moments.add(Xd[:20], Xc[:20])
    moments.add(Xd[20:], Xc[20:])
    B, b = corrected_second_factor(W, b0, A, moments, fit_bias=True)
    Z = torch.cat([Xc @ A.T, torch.ones(T, 1, dtype=torch.float64)], 1)
    target = Xd @ W.T + b0
    direct = torch.linalg.lstsq(Z, target).solution.T
    torch.testing.assert_close(torch.cat([B, b[:, None]], 1), direct, rtol=1e-8, atol=1e-10)
    layer = LowRankLinear.from_factors(B, A, b, dtype=torch.float64)
    by_hand = float(((Xc @ A.T @ B.T + b - target) ** 2).sum())
    assert output_error(W, b0, layer, moments) == pytest.approx(by_hand, rel=1e-9)
    B0, none = corrected_second_factor(W, None, A, moments, fit_bias=False)
    assert none is None
    torch.testing.assert_close(B0, torch.linalg.lstsq(Xc @ A.T, Xd @ W.T).solution.T, rtol=1e-8, atol=1e-10)
    local = PairedMoments.zeros(n, torch.device("cpu"))  # SVD-LLM's target: the dense layer on x_c
    local.add(Xc, Xc)
    B1, b1 = corrected_second_factor(W, b0, A, local, fit_bias=True)
    torch.testing.assert_close(torch.cat([B1, b1[:, None]], 1),
                               torch.linalg.lstsq(Z, Xc @ W.T + b0).solution.T, rtol=1e-8, atol=1e-10)


def test_update_on_cached_dense_statistics_equals_the_update_that_computes_them(tiny, tmp_path):
    """The second run finds the dense statistics cached and runs no dense stream (local target):
    the same corrections and model as the first, which computed them from that stream."""
    options = LayerwiseOptions(enabled=True, sequential_update=True)
    first, model_a = compress(tiny, tmp_path, Uniform(), layerwise=options)
    second, model_b = compress(tiny, tmp_path, Uniform(), layerwise=options)
    assert first.diagnostics["statistics_computed"] and not second.diagnostics["statistics_computed"]
    assert second.diagnostics["calibration_passes"] == first.diagnostics["calibration_passes"] - 1
    errors_a, errors_b = first.diagnostics["sequential_update"], second.diagnostics["sequential_update"]
    assert errors_a.keys() == errors_b.keys()
    for name in errors_a:
        assert errors_b[name] == pytest.approx(errors_a[name], rel=1e-9), name
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(("target", "compressed_inputs"), [("dense", True), ("local", False), ("dense", False)])
def test_sequential_update_runs_in_whole_model_mode_too(tiny, tmp_path, target, compressed_inputs):
    whole = LayerwiseOptions(enabled=False, compressed_inputs=compressed_inputs, sequential_update=True,
                             update_target=target)
    layer = LayerwiseOptions(enabled=True, compressed_inputs=compressed_inputs, sequential_update=True,
                             update_target=target)
    a, model_a = compress(tiny, tmp_path / "a", Uniform(), layerwise=whole)
    b, model_b = compress(tiny, tmp_path / "b", Uniform(), layerwise=layer)
    assert a.diagnostics["sequential_update"] and a.ranks == b.ranks
    assert a.metrics["ppl/embedded"] == pytest.approx(b.metrics["ppl/embedded"], rel=1e-5)


def test_bad_update_target_is_named():
    with pytest.raises(ConfigError, match="update_target='lsq' is not one of"):
        LayerwiseOptions(sequential_update=True, update_target="lsq")
