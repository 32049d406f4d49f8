"""The pipeline's own choices, on the tiny random model."""

import copy

import pytest
from conftest import spec

from lrc import pipeline
from lrc.allocators.energy import Energy
from lrc.compress import stage as compression
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.factorizers.svdllm import SVDLLM
from lrc.model.loading import LoadedModel


def compress(tiny, tmp_path, allocator):
    loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.identity)
    calibration = Calibration(EmbeddedText(), nsamples=4, seqlen=64)
    bench = [PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=64, max_windows=8)]
    return pipeline.compress_and_evaluate(loaded, spec(SVDLLM(), allocator, 0.4, calibration, bench,
                                          cache_dir=tmp_path, measure_forward=False))


def test_spectrum_allocators_give_the_same_result_when_decompositions_are_not_kept(tiny, tmp_path, monkeypatch):
    kept = compress(tiny, tmp_path, Energy())
    monkeypatch.setattr(compression, "KEEP_DECOMPOSITIONS_BYTES", 0)  # decompose twice instead of holding them
    recomputed = compress(tiny, tmp_path, Energy())
    assert kept.ranks == recomputed.ranks
    assert kept.metrics == pytest.approx(recomputed.metrics, rel=1e-6)
    assert kept.diagnostics["allocation"]["energy_threshold"] > 0
