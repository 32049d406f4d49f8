"""LoRA recovery fine-tuning: trains, merges back with the parameter count unchanged, reloads exactly."""

import copy
import json

import pytest
import torch
from conftest import spec

from lrc import load_compressed, pipeline
from lrc.allocators.uniform import Uniform
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.errors import ConfigError
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.factorizers.svdllm import SVDLLM
from lrc.finetune.lora import LoRA
from lrc.model.checkpoint import low_rank_modules, save_compressed
from lrc.model.loading import LoadedModel, tiny_random
from lrc.pipeline import RunSpec

IDS = (torch.arange(60)[None] * 7) % 250


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def compressed_and_tuned(tmp_path_factory):
    """tiny-random at ratio 0.4, uniform svdllm, then LoRA on its factors through the pipeline."""
    tiny = tiny_random(device="cpu")
    loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.identity)
    calibration = Calibration(EmbeddedText(), nsamples=4, seqlen=64)
    bench = [PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=64, max_windows=4)]
    base = spec(SVDLLM(), Uniform(), 0.4, calibration, bench, cache_dir=tmp_path_factory.mktemp("cache"),
                measure_forward=False)
    tune = LoRA(EmbeddedText("calibration"), steps=12, lr=1e-2, rank=4, nsamples=8, seqlen=64, batch_size=2,
                warmup=1)
    run = RunSpec(base.method, base.ratio, base.calibration, base.benchmarks, base.settings, finetune=tune)
    outcome = pipeline.compress_and_evaluate(loaded, run)
    return loaded, outcome


def test_lora_trains_and_merges_with_the_parameter_count_unchanged(compressed_and_tuned):
    loaded, outcome = compressed_and_tuned
    tuned = outcome.diagnostics["finetune"]
    assert len(tuned["losses"]) == 12 and tuned["modules"] == 2 * len(low_rank_modules(loaded.model)) > 0
    assert sum(tuned["losses"][-3:]) < sum(tuned["losses"][:3])  # it learned the text
    # merged: no LoRA module is left, and the model stores exactly what the plan allows
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    assert sum(p.numel() for p in loaded.model.parameters()) == outcome.params["model_after"]
    assert {n: m.rank for n, m in low_rank_modules(loaded.model).items()} == \
        {n: r for n, r in outcome.ranks.items() if n in low_rank_modules(loaded.model)}
    # before / after: the benchmark ran on both, and fine-tuning on in-domain text helped it
    before, after = tuned["metrics_before"]["ppl/embedded"], outcome.metrics["ppl/embedded"]
    assert after < before
    assert outcome.tables["finetune_loss"][1][0] == [0, tuned["losses"][0]]
    assert all(p.requires_grad for p in loaded.model.parameters())  # as they were before


def test_fine_tuned_model_saves_and_reloads_with_identical_logits(compressed_and_tuned, tmp_path):
    loaded, outcome = compressed_and_tuned
    path = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "ckpt", record={"ranks": outcome.ranks})
    model, _ = load_compressed(path)
    assert torch.equal(logits(model, IDS), logits(loaded.model, IDS))
    assert sum(p.numel() for p in model.parameters()) == outcome.params["model_after"]


def test_lora_changes_only_the_factors(tmp_path):
    loaded = compressed_tiny(tmp_path)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    LoRA(EmbeddedText(), steps=2, lr=1e-2, nsamples=2, seqlen=32, batch_size=1, warmup=0).run(
        loaded.model, loaded.tokenizer)
    after = loaded.model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".first.weight", ".second.weight")) for k in changed)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps=0"), ({"lr": -1.0}, "lr=-1.0"), ({"rank": 2.5}, "rank=2.5"),
    ({"targets": "heads"}, "targets='heads'"), ({"dropout": 1.0}, "dropout=1.0"), ({"seqlen": 1}, "seqlen=1"),
])
def test_bad_options_are_clear(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoRA(EmbeddedText(), **kwargs)


def test_lora_on_an_uncompressed_model_is_a_clear_error():
    tiny = tiny_random(device="cpu")
    with pytest.raises(ConfigError, match="no low-rank factors"):
        LoRA(EmbeddedText(), steps=1).run(copy.deepcopy(tiny.model), tiny.tokenizer)


def test_finetune_config_group_builds(tmp_path):
    from conftest import compose

    from lrc.config.build import build_finetune

    assert build_finetune(compose([])) is None  # finetune=none is the default
    tune = build_finetune(compose(["finetune=lora", "finetune.steps=3"]))
    assert isinstance(tune, LoRA) and tune.steps == 3 and tune.source == EmbeddedText("calibration")
    assert json.loads(json.dumps(tune.describe()))["source"]["split"] == "calibration"
    with pytest.raises(ConfigError, match="finetune=lora: lr='fast'"):
        build_finetune(compose(["finetune=lora", "finetune.lr=fast"]))
    big = build_finetune(compose(["finetune=lora_7b"]))
    assert big.steps == 500 and big.seqlen == 1024


def compressed_tiny(tmp_path):
    tiny = tiny_random(device="cpu")
    loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.identity)
    calibration = Calibration(EmbeddedText(), nsamples=2, seqlen=32)
    pipeline.compress_and_evaluate(loaded, spec(SVDLLM(), Uniform(), 0.3, calibration, [], cache_dir=tmp_path,
                                                measure_forward=False))
    return loaded


def test_lora_is_deterministic_and_restores_the_model_state(tmp_path):
    short = LoRA(EmbeddedText(), steps=3, lr=1e-2, nsamples=4, seqlen=32, batch_size=2, warmup=0)
    first, second = compressed_tiny(tmp_path), compressed_tiny(tmp_path)
    frozen = "model.embed_tokens.weight"
    for loaded in (first, second):
        loaded.model.eval()
        loaded.model.get_parameter(frozen).requires_grad_(False)
    state = torch.random.get_rng_state()
    short.run(first.model, first.tokenizer)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is untouched
    short.run(second.model, second.tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 second.model.state_dict().values(), strict=True))
    assert not first.model.training and not first.model.get_parameter(frozen).requires_grad
    assert not hasattr(first.model, "peft_config")


def test_a_diverging_run_leaves_the_model_as_it_was(tmp_path):
    from lrc.errors import NumericalError

    loaded = compressed_tiny(tmp_path)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(NumericalError, match="lower finetune.lr=1e\\+30"):
        LoRA(EmbeddedText(), steps=6, lr=1e30, nsamples=4, seqlen=32, batch_size=2, warmup=0).run(
            loaded.model, loaded.tokenizer)
    after = loaded.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_export_refuses_a_fine_tuned_run(tmp_path):
    from lrc.errors import DataError
    from lrc.export import export

    (tmp_path / "result.json").write_text(json.dumps({"status": "done", "ranks": {}, "config": {
        "finetune": {"name": "lora", "_target_": "lrc.finetune.lora.LoRA"}}}))
    with pytest.raises(DataError, match="was fine-tuned .*save=true"):
        export(tmp_path)
