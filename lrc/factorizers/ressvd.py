"""ResSVD: residual compensation of the truncation (arXiv 2505.20112).

The rank r is split as r = r_1 + r_2 with r_2 = round(beta m n / (m + n)) (at most r - 1).
Stage 1 truncates W to rank r_1 (whitened by default) giving W_1; stage 2 truncates the
residual W - W_1 to rank r_2 (plain weight metric by default) giving R_2; W' = W_1 + R_2,
stored as one rank-r pair by concatenating the factors.

If both stages use the same metric, Eckart-Young makes W' identical to one rank-r
truncation in that metric (tests check this); the method's gain comes from the two stages
using different metrics. The spectrum exposed to allocators is stage 1's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrc.errors import ConfigError
from lrc.factorizers.base import Decomposition, Factorizer
from lrc.factorizers.spectral import left_singular
from lrc.factorizers.svdllm import SVDLLM
from lrc.stats.types import InputStatistics

METRICS = ("whitened", "plain")


@dataclass
class ResidualDecomposition(Decomposition):
    """Stage 1 as a projection basis; stage 2 computed for each requested rank."""

    weight: torch.Tensor | None = None
    stage1_scale: torch.Tensor | None = None  # S of stage 1 (None: plain)
    stage2_scale: torch.Tensor | None = None  # S of stage 2 (None: plain)
    residual_rank: int = 0
    route: str = "eigh"
    fallback: bool = False

    def split(self, rank: int) -> tuple[int, int]:
        r2 = min(self.residual_rank, rank - 1)
        return rank - r2, r2

    def factors(self, rank: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_rank(rank)
        B1, A1 = super().factors(self.split(rank)[0])
        r2 = self.split(rank)[1]
        B, A = B1, A1
        if r2 > 0:
            residual = self.weight - B1 @ A1
            scaled = residual if self.stage2_scale is None else residual @ self.stage2_scale
            U2 = left_singular(scaled, self.route, r2, self.fallback)[0].to(residual.dtype)
            B, A = torch.cat([B1, U2], 1), torch.cat([A1, U2.T @ residual], 0)
        if dtype is not None:
            B, A = B.to(dtype), A.to(dtype)
        return B.contiguous(), A.contiguous()

    def truncation_error(self, rank: int) -> float:
        """||(W - W') S_1||_F² of the combined truncation, in stage 1's metric."""
        B, A = self.factors(rank)
        diff = self.weight - B @ A
        if self.stage1_scale is not None:
            diff = diff @ self.stage1_scale
        return float((diff ** 2).sum())


class ResSVD(Factorizer):
    def __init__(self, beta: float = 0.05, stage1: str = "whitened", stage2: str = "plain",
                 whitening: str = "cholesky", damping: float = 0.0, compute_dtype: str = "float64",
                 route: str = "eigh", shrinkage: float = 0.0) -> None:
        super().__init__(compute_dtype, route)
        if not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ConfigError(f"beta={beta!r} must be in [0, 1) (ResSVD's residual rank fraction; paper: 0.05)")
        for key, value in (("stage1", stage1), ("stage2", stage2)):
            if value not in METRICS:
                raise ConfigError(f"{key}={value!r} is not one of {METRICS}")
        self.beta, self.stage1, self.stage2 = float(beta), stage1, stage2
        self.whitener = SVDLLM(whitening=whitening, damping=damping, compute_dtype=compute_dtype, shrinkage=shrinkage)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"gram"}) if "whitened" in (self.stage1, self.stage2) else frozenset()

    def decompose(self, weight: torch.Tensor, stats: InputStatistics | None = None,
                  max_rank: int | None = None) -> Decomposition:
        W = weight.detach().to(self.compute_dtype)
        m, n = W.shape
        S, diagnostics = (self.whitener.shared_whitening(stats, W) if self.needs else (None, {}))
        S1 = S if self.stage1 == "whitened" else None
        U, sigma = left_singular(W if S1 is None else W @ S1, self.route, max_rank, self.fallback)
        W = W.to(U.dtype)  # float64 where auto fell back
        S, S1 = (None if t is None else t.to(U.dtype) for t in (S, S1))
        return ResidualDecomposition(
            left=U, right=U.T @ W, spectrum=sigma, diagnostics=self.noted(diagnostics, U), weight=W, stage1_scale=S1,
            stage2_scale=S if self.stage2 == "whitened" else None, residual_rank=round(self.beta * m * n / (m + n)),
            route=self.route, fallback=self.fallback)
