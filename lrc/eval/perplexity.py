"""Benchmarks: perplexity the papers' way.

The test text is tokenized as ONE stream and cut into non-overlapping windows of
``seqlen`` tokens (a final partial window is dropped, as in the papers); perplexity is
exp(mean next-token NLL over every predicted token of every window). No window is
skipped: a non-finite loss is an error, not a skip (SVD-LLM's own code skips them).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lrc.data.windows import tokenize
from lrc.errors import ConfigError, DataError, NumericalError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityBenchmark:
    """Perplexity of a text source; reported as ``ppl/<name>``."""

    name: str
    source: Any  # an lrc.data.sources text source
    seqlen: int = 512
    batch_size: int = 4
    max_windows: int | None = None  # None: every window

    def __post_init__(self) -> None:
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ConfigError(f"benchmark {self.name}: seqlen={self.seqlen!r} must be an integer >= 2")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"benchmark {self.name}: batch_size={self.batch_size!r} must be >= 1")

    @property
    def metric(self) -> str:
        return f"ppl/{self.name}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source.describe(), "seqlen": self.seqlen,
                "max_windows": self.max_windows}

    def windows(self, tokenizer: Any) -> torch.Tensor:
        ids = tokenize(tokenizer, self.source.text())
        n = ids.numel() // self.seqlen
        if n == 0:
            raise DataError(f"benchmark {self.name}: test text has {ids.numel()} tokens, "
                            f"shorter than one window of seqlen={self.seqlen}")
        if self.max_windows is not None:
            n = min(n, self.max_windows)
        return ids[: n * self.seqlen].view(n, self.seqlen)

    def run(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        return {self.metric: perplexity(model, self.windows(tokenizer), self.batch_size, desc=self.metric)}


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean NLL) over all next-token predictions of ``windows`` (n x seqlen)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        starts = range(0, windows.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, leave=False, disable=None):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                  reduction="none").view(batch.shape[0], -1).sum(1).double()
            bad = (~torch.isfinite(nll)).nonzero().flatten().tolist()
            if bad:
                raise NumericalError(f"{desc}: non-finite loss in window {start + bad[0]} of {windows.shape[0]}")
            total_nll += float(nll.sum())
            total_tokens += nll.numel() * (windows.shape[1] - 1)
    value = math.exp(total_nll / total_tokens)
    if not math.isfinite(value):
        raise NumericalError(f"{desc}: perplexity overflowed (mean NLL {total_nll / total_tokens:.1f})")
    return value


def run_benchmarks(model: nn.Module, tokenizer: Any, benchmarks: list[Any]) -> dict[str, float]:
    """Every benchmark's metrics (perplexity sets, lm-eval zero-shot tasks) in one dict."""
    metrics: dict[str, float] = {}
    for bench in benchmarks:
        metrics.update(bench.run(model, tokenizer))
    return metrics
