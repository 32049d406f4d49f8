"""Plain truncated SVD of W: the data-free control (catastrophic on real LLMs)."""

from __future__ import annotations

import torch

from lrc.factorizers.base import Decomposition, Factorizer
from lrc.stats.types import InputStatistics


class PlainSVD(Factorizer):
    """W ≈ U_r Σ_r V_rᵀ; the loss is ||W - W'||_F², the sum of discarded σ²."""

    needs = frozenset()

    def decompose(self, weight: torch.Tensor, stats: InputStatistics | None = None,
                  max_rank: int | None = None) -> Decomposition:
        W = weight.detach().to(self.compute_dtype)
        return self.projection(W, W, max_rank)
