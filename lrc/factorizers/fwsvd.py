"""FWSVD: Fisher-weighted SVD (Hsu et al., 2022, arXiv 2207.00112).

Row importances I_i = sqrt(sum_j E[(dL/dW_ij)²]) from calibration gradients of the LM
loss; with D = diag(I): D W = U Σ Vᵀ, W' = D⁻¹ U_r Σ_r V_rᵀ = D⁻¹ U_r U_rᵀ D W.
The loss is ||D (W - W')||_F², the sum of discarded σ² in the weighted space.
Importances below ``floor`` x max(I) are raised to it (recorded), so D⁻¹ stays finite.
"""

from __future__ import annotations

import torch

from lrc.errors import ConfigError
from lrc.factorizers.base import Decomposition, Factorizer, require
from lrc.factorizers.spectral import left_singular
from lrc.stats.types import InputStatistics


class FWSVD(Factorizer):
    needs = frozenset({"fisher"})

    def __init__(self, floor: float = 1e-6, compute_dtype: str = "float64", route: str = "eigh") -> None:
        super().__init__(compute_dtype, route)
        if not isinstance(floor, (int, float)) or not 0 < floor < 1:
            raise ConfigError(f"floor={floor!r} must be in (0, 1) (relative to the largest row importance)")
        self.floor = float(floor)

    def decompose(self, weight: torch.Tensor, stats: InputStatistics | None = None,
                  max_rank: int | None = None) -> Decomposition:
        W = weight.detach().to(self.compute_dtype)
        fisher = require(stats, "fisher", W.shape[0], "fwsvd").to(W).clamp(min=0)
        importance = fisher.sqrt()
        top = float(importance.max())
        if top <= 0:  # no gradient reached this weight: every row equally important
            importance, clamped = torch.ones_like(importance), importance.numel()
        else:
            clamped = int((importance < self.floor * top).sum())
            importance = importance.clamp(min=self.floor * top)
        U, sigma = left_singular(importance[:, None] * W, self.route, max_rank, self.fallback)
        importance, W = importance.to(U.dtype), W.to(U.dtype)  # float64 where auto fell back
        return Decomposition(left=U / importance[:, None], right=U.T @ (importance[:, None] * W), spectrum=sigma,
                             diagnostics=self.noted({"clamped_rows": clamped}, U))
