"""Scoring candidate rank plans on held-out validation windows (search-based allocators).

The dense model's next-token log-probabilities are computed once; each candidate plan is
swapped in (:func:`lrc.compress.swap.plan_applied`), evaluated, and swapped out again. The score is
built by :meth:`lrc.allocators.base.Validation.score` from the validation perplexity and the
reverse KL divergence KL(compressed || dense) = sum_v q_v (log q_v - log p_v), taken at every
position of every window (as Bolaco's lib/evaluator.py does) and averaged per token here.
Every call is recorded as one trial (the run logs them to W&B from its outcome).

A :class:`ScoreMemo` keeps the measured (ppl, KL) of every plan on disk, keyed by what
determines them (model, statistics, factorizer, the validation windows and their shape): a plan scored once is
never evaluated again, by any run of a sweep (ASVD's sensitivity table is shared by every
ratio) or by a re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrc.allocators.base import Score, Validation
from lrc.budget import Budget
from lrc.compress.swap import plan_applied
from lrc.errors import NumericalError
from lrc.factorizers.base import Decomposition
from lrc.files import atomic_write_json, cache_key
from lrc.model.adapters import TargetLinear
from lrc.stats.collect import batches

log = logging.getLogger(__name__)


def _logprobs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)


class ScoreMemo:
    """Measured (ppl, per-position KL) of plans: one small JSON file per plan in a folder per
    scoring setup, written atomically, so concurrent jobs of a sweep add to it safely."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(identity: Mapping[str, Any], windows: torch.Tensor) -> str:
        head = json.dumps({**identity, "windows": [list(windows.shape), str(windows.dtype)]}, sort_keys=True,
                          default=str)
        return hashlib.sha256(head.encode() + windows.cpu().numpy().tobytes()).hexdigest()[:32]

    def get(self, plan: Mapping[str, int]) -> tuple[float, float] | None:
        try:
            ppl, kl = json.loads((self.folder / f"{cache_key(dict(plan))}.json").read_text())
        except (OSError, ValueError, TypeError):
            return None
        return float(ppl), float(kl)

    def put(self, plan: Mapping[str, int], ppl: float, kl: float) -> None:
        atomic_write_json(self.folder / f"{cache_key(dict(plan))}.json", [ppl, kl])


class PlanScorer:
    """``scorer(plan, **info) -> Score``; ``scorer.trials`` holds one row per call."""

    def __init__(self, model: nn.Module, targets: list[TargetLinear], decompositions: Mapping[str, Decomposition],
                 windows: torch.Tensor, budget: Budget, validation: Validation, memo: ScoreMemo | None = None) -> None:
        self.model, self.targets, self.decompositions = model, targets, decompositions
        self.budget, self.validation, self.memo = budget, validation, memo
        self.device = next(model.parameters()).device
        self.batches = list(batches(windows, validation.batch_size))
        self.dense: list[torch.Tensor] | None = None  # the dense reference, computed on first need
        self.trials: list[dict[str, Any]] = []

    def reference(self) -> None:
        """The dense model's log-probabilities on the validation windows, kept on the CPU."""
        if self.dense is None:
            with torch.inference_mode():
                self.dense = [_logprobs(self.model, b.to(self.device)).cpu() for b in self.batches]

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(perplexity, reverse KL to the dense model per position) of ``model`` on the validation windows
        (the dense reference must be computed first: :meth:`reference`)."""
        assert self.dense is not None, "PlanScorer.reference() runs before a plan is swapped in"
        nll, kl, predicted, positions = 0.0, 0.0, 0, 0
        with torch.inference_mode():
            for batch, dense in zip(self.batches, self.dense, strict=True):
                batch = batch.to(self.device)
                logq = _logprobs(model, batch)
                logp = dense.to(self.device)
                nll -= float(logq[:, :-1].gather(-1, batch[:, 1:, None]).sum(dtype=torch.float64))
                kl += float((logq.exp() * (logq - logp)).sum(dtype=torch.float64))
                predicted += batch[:, 1:].numel()
                positions += batch.numel()
        if not math.isfinite(nll) or not math.isfinite(kl):
            raise NumericalError("validation loss of a candidate plan is not finite")
        return math.exp(min(nll / predicted, 700.0)), kl / positions

    def __call__(self, plan: Mapping[str, int], **info: Any) -> Score:
        start = time.perf_counter()
        measured = self.memo.get(plan) if self.memo is not None else None
        remembered = measured is not None  # scored before (an earlier run, or this run before a requeue)
        if measured is None:
            self.reference()
            with plan_applied(self.model, self.targets, plan, self.decompositions) as model:
                measured = self.evaluate(model)
            if self.memo is not None:
                self.memo.put(plan, *measured)
        score = self.validation.score(*measured, window_length=self.batches[0].shape[1])
        row = {"trial": len(self.trials), **info, "objective": score.objective, "ppl": score.ppl, "kl": score.kl,
               "removed_fraction": self.budget.removed_fraction(plan), "seconds": time.perf_counter() - start,
               "memoised": remembered}
        self.trials.append(row)
        log.debug("trial %d: objective %.4g (ppl %.4g, kl %.4g)", row["trial"], score.objective, score.ppl, score.kl)
        return score
