"""ASVD: activation-aware SVD (Yuan et al., 2023, arXiv 2312.05821).

Input channels are scaled by their mean activation magnitude before the SVD:
S = diag(mean_t |x_tj|)^alpha, W S = U Σ Vᵀ, W' = U_r Σ_r V_rᵀ S⁻¹ = U_r U_rᵀ W.
The loss is ||(W - W') S||_F², the sum of discarded σ² in the scaled space. The
projection form needs no S⁻¹, so channels that never fire (mean |x| = 0) are harmless.
"""

from __future__ import annotations

import torch

from lrc.errors import ConfigError
from lrc.factorizers.base import Decomposition, Factorizer, require
from lrc.stats.types import InputStatistics


class ASVD(Factorizer):
    needs = frozenset({"mean_abs"})

    def __init__(self, alpha: float = 0.5, compute_dtype: str = "float64", route: str = "eigh") -> None:
        super().__init__(compute_dtype, route)
        if not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ConfigError(f"alpha={alpha!r} must be a number >= 0 (ASVD's exponent; paper: 0.5)")
        self.alpha = float(alpha)

    def decompose(self, weight: torch.Tensor, stats: InputStatistics | None = None,
                  max_rank: int | None = None) -> Decomposition:
        W = weight.detach().to(self.compute_dtype)
        scale = require(stats, "mean_abs", W.shape[1], "asvd").to(W).clamp(min=0) ** self.alpha
        return self.projection(W * scale, W, max_rank, {"alpha": self.alpha})
