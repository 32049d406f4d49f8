"""Compressed checkpoints: exact round trip, merged dense export, clear errors on bad folders."""

import copy
import json
import shutil
import struct

import pytest
import torch
from conftest import spec
from transformers import AutoModelForCausalLM

from lrc import load_compressed, pipeline
from lrc.allocators.mgaa import MGAA
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.errors import DataError
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.factorizers.feature_pca import FeaturePCA
from lrc.model.checkpoint import PLAN_FILE, save_compressed
from lrc.model.layers import LowRankLinear
from lrc.model.loading import LoadedModel, tiny_random


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """tiny-random compressed by MGAA x feature_pca (uneven ranks, bias corrections)."""
    tiny = tiny_random(device="cpu")
    loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.identity)
    calibration = Calibration(EmbeddedText(), nsamples=4, seqlen=64)
    bench = [PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=64, max_windows=4)]
    outcome = pipeline.compress_and_evaluate(loaded, spec(FeaturePCA(groups=4), MGAA(), 0.4, calibration, bench,
                                             cache_dir=tmp_path_factory.mktemp("cache"), measure_forward=False))
    return loaded, outcome


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


IDS = (torch.arange(60)[None] * 7) % 250


def tensor_bytes(path):
    """Bytes of tensor data in a safetensors file (file size minus its header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def test_round_trip_is_exact_and_matches_the_rank_plan(compressed, tmp_path):
    loaded, outcome = compressed
    path = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "ckpt", record={"ranks": outcome.ranks})
    model, tokenizer = load_compressed(path)
    assert torch.equal(logits(model, IDS), logits(loaded.model, IDS))
    shapes = outcome.diagnostics["shapes"]  # the plan's factorized matrices: factors smaller than m n
    planned = {n: r for n, r in outcome.ranks.items() if r * sum(shapes[n]) < shapes[n][0] * shapes[n][1]}
    assert planned and {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == planned
    assert sum(p.numel() for p in model.parameters()) == outcome.params["model_after"]
    # every stored byte is a parameter of the plan: float32 factors, biases, norms, embeddings
    assert tensor_bytes(path / "model.safetensors") == 4 * outcome.params["model_after"]
    assert tokenizer("hello")["input_ids"] == loaded.tokenizer("hello")["input_ids"]
    assert json.loads((path / "result.json").read_text())["ranks"] == outcome.ranks
    assert not [p for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]  # no pickle


def test_merged_checkpoint_loads_with_plain_transformers(compressed, tmp_path):
    loaded, outcome = compressed
    path = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "merged", merge=True)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, IDS), logits(loaded.model, IDS), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, LowRankLinear) for m in loaded.model.modules())  # the in-memory model is kept


def test_bad_checkpoints_give_clear_errors(compressed, tmp_path):
    loaded, _ = compressed
    good = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "good")

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(DataError, match="corrupted or truncated"):
        load_compressed(truncated)

    garbled = tmp_path / "garbled"
    shutil.copytree(good, garbled)
    raw = bytearray((garbled / "model.safetensors").read_bytes())
    raw[8:40] = b"x" * 32  # the JSON header
    (garbled / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupted or truncated"):
        load_compressed(garbled)

    no_plan = tmp_path / "no_plan"
    shutil.copytree(good, no_plan)
    (no_plan / PLAN_FILE).unlink()
    with pytest.raises(DataError, match="not an lrc compressed checkpoint.*from_pretrained"):
        load_compressed(no_plan)

    other = tmp_path / "other"  # another model's folder with this plan copied in
    tiny_random(device="cpu", hidden_size=32, intermediate_size=64).model.save_pretrained(other)
    shutil.copy(good / PLAN_FILE, other / PLAN_FILE)
    with pytest.raises(DataError, match="another model"):
        load_compressed(other)

    with pytest.raises(DataError, match="not a directory"):
        load_compressed(tmp_path / "missing")


def test_save_refuses_an_uncompressed_model(tmp_path):
    tiny = tiny_random(device="cpu")
    with pytest.raises(DataError, match="nothing was compressed"):
        save_compressed(tiny.model, tiny.tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_run_saves_and_export_and_generate_read_it(tmp_path, capsys):
    from test_run import TINY, cli

    from lrc.export import main as export_main
    from lrc.generate import main as generate_main

    out = tmp_path / "run"
    proc = cli([*TINY, "save=true"], out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "result.json").read_text())
    saved, _ = load_compressed(record["checkpoint"])
    shapes = record["diagnostics"]["shapes"]  # the plan's factorized matrices: factors smaller than m n
    planned = {n: r for n, r in record["ranks"].items() if r * sum(shapes[n]) < shapes[n][0] * shapes[n][1]}
    assert len(planned) == 14
    assert {n: m.rank for n, m in saved.named_modules() if isinstance(m, LowRankLinear)} == planned
    assert export_main([str(out), "--out", str(tmp_path / "exported")]) == 0
    exported, _ = load_compressed(tmp_path / "exported")
    assert torch.equal(logits(exported, IDS), logits(saved, IDS))  # the same model, recompressed
    assert generate_main([str(tmp_path / "exported"), "hello", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert generate_main([str(tmp_path / "nowhere"), "hello"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_save_never_deletes_a_folder_that_is_not_a_checkpoint(compressed, tmp_path):
    loaded, _ = compressed
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not an lrc checkpoint; refusing to overwrite"):
        save_compressed(loaded.model, loaded.tokenizer, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary folder left behind
    # an earlier checkpoint is replaced, and only by a complete new one
    target = tmp_path / "ckpt"
    save_compressed(loaded.model, loaded.tokenizer, target)
    (target / "stale.txt").write_text("from the first save")
    save_compressed(loaded.model, loaded.tokenizer, target)
    assert not (target / "stale.txt").exists() and (target / PLAN_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "precious"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_compressed(loaded.model, loaded.tokenizer, empty) == empty and (empty / PLAN_FILE).is_file()
