import math

import pytest
import torch
import torch.nn.functional as F

from lrc.data.sources import EmbeddedText, TextFile
from lrc.errors import DataError, NumericalError
from lrc.eval.perplexity import PerplexityBenchmark, perplexity


def test_perplexity_matches_manual_computation(tiny):
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny.model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))
    assert perplexity(tiny.model, windows, batch_size=2) == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_benchmark_uses_every_full_window(tiny):
    bench = PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=1000)
    windows = bench.windows(tiny.tokenizer)
    n_tokens = len(tiny.tokenizer(EmbeddedText("test").text(), add_special_tokens=False)["input_ids"])
    assert windows.shape == (n_tokens // 1000, 1000)


def test_non_finite_loss_is_an_error_not_a_skip(tiny):
    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kw):
            out = self.inner(input_ids=input_ids, **kw)
            out.logits[-1, 3, 0] = float("nan")
            return out

    windows = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NumericalError, match="non-finite loss in window 2"):
        perplexity(Broken(tiny.model), windows, batch_size=3)


def test_test_text_shorter_than_a_window_is_clear(tiny, tmp_path):
    (tmp_path / "t.txt").write_text("abc")
    with pytest.raises(DataError, match="shorter than one window"):
        PerplexityBenchmark("t", TextFile(str(tmp_path / "t.txt")), seqlen=16).windows(tiny.tokenizer)
