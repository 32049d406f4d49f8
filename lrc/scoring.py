"""Scoring candidate rank plans on held-out validation windows (search-based allocators).

The dense model's next-token log-probabilities are computed once; each candidate plan is
swapped in (:func:`lrc.swap.plan_applied`), evaluated, and swapped out again. The score is
the validation perplexity plus ``kl_weight`` times the reverse KL divergence
KL(compressed || dense) = sum_v q_v (log q_v - log p_v), averaged over predicted tokens.
Every call is recorded as one trial (and logged to the tracker as it happens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrc.adapters import TargetLinear
from lrc.allocators.base import Score
from lrc.budget import Budget
from lrc.errors import NumericalError
from lrc.factorizers.base import Decomposition
from lrc.statistics import batches
from lrc.swap import plan_applied
from lrc.tracking import Tracker


def _logprobs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)


class PlanScorer:
    """``scorer(plan, **info) -> Score``; ``scorer.trials`` holds one row per call."""

    def __init__(self, model: nn.Module, targets: list[TargetLinear], decompositions: Mapping[str, Decomposition],
                 windows: torch.Tensor, budget: Budget, batch_size: int = 4, kl_weight: float = 1.0,
                 tracker: Tracker | None = None) -> None:
        self.model, self.targets, self.decompositions = model, targets, decompositions
        self.budget, self.kl_weight, self.tracker = budget, float(kl_weight), tracker
        self.device = next(model.parameters()).device
        self.batches = list(batches(windows, batch_size))
        with torch.inference_mode():  # the dense reference, kept on the CPU between trials
            self.dense = [_logprobs(model, b.to(self.device)).cpu() for b in self.batches]
        self.trials: list[dict[str, Any]] = []

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(perplexity, mean reverse KL to the dense model) of ``model`` on the validation windows."""
        nll, kl, count = 0.0, 0.0, 0
        with torch.inference_mode():
            for batch, dense in zip(self.batches, self.dense, strict=True):
                batch = batch.to(self.device)
                logq = _logprobs(model, batch)
                logp = dense.to(self.device)
                nll -= float(logq.gather(-1, batch[:, 1:, None]).sum(dtype=torch.float64))
                kl += float((logq.exp() * (logq - logp)).sum(dtype=torch.float64))
                count += batch[:, 1:].numel()
        if not math.isfinite(nll):
            raise NumericalError("validation loss of a candidate plan is not finite")
        return math.exp(min(nll / count, 700.0)), kl / count

    def __call__(self, plan: Mapping[str, int], **info: Any) -> Score:
        start = time.perf_counter()
        with plan_applied(self.model, self.targets, plan, self.decompositions) as model:
            ppl, kl = self.evaluate(model)
        score = Score(objective=ppl + self.kl_weight * kl, ppl=ppl, kl=kl)
        row = {"trial": len(self.trials), **info, "objective": score.objective, "ppl": ppl, "kl": kl,
               "removed_fraction": self.budget.removed_fraction(plan), "seconds": time.perf_counter() - start}
        self.trials.append(row)
        if self.tracker is not None:
            self.tracker.log_metrics({f"trial/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        return score
