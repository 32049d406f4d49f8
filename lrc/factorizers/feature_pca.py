"""Output-feature PCA, Bolaco's factorization (arXiv 2405.10616).

With the covariance C_y of the layer's outputs, C_y = U Λ Uᵀ, keep the top-r principal
directions: B = U_r, A = U_rᵀ W, and a bias b = (I - U_r U_rᵀ) E[y] so the output mean is
preserved. The loss is E||(I - U_r U_rᵀ)(y - E y)||², the sum of discarded eigenvalues
(the spectrum holds their square roots).

For a linear layer y = W x + b the output statistics follow exactly from the input's:
C_y = W C_x Wᵀ and E[y] = W E[x] + b. So one input covariance per shared input (q/k/v,
gate/up) serves every linear reading it, instead of an m x m matrix per linear.
``pooled`` (the paper's) uses the pooled covariance over ``groups`` contiguous groups of
calibration tokens (the mean of per-group sample covariances); ``pooled: false`` uses the
plain sample covariance.
"""

from __future__ import annotations

import torch

from lrc.errors import ConfigError
from lrc.factorizers.base import Decomposition, Factorizer, require
from lrc.stats.types import InputStatistics


class FeaturePCA(Factorizer):
    def __init__(self, pooled: bool = True, groups: int = 32, compute_dtype: str = "float64") -> None:
        super().__init__(compute_dtype)
        if not isinstance(groups, int) or groups < 1:
            raise ConfigError(f"groups={groups!r} must be a positive integer")
        self.pooled, self.groups = bool(pooled), groups

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"pooled_cov:{self.groups}", "mean"} if self.pooled else {"gram", "mean"})

    def added_params(self, shape: tuple[int, int], has_bias: bool) -> int:
        """The output-mean bias: m new parameters on a linear without a bias (else folded into it)."""
        return 0 if has_bias else shape[0]

    def input_covariance(self, stats: InputStatistics | None, n: int) -> torch.Tensor:
        if self.pooled:
            return require(stats, "pooled_cov", n, "feature_pca")
        gram, mean = require(stats, "gram", n, "feature_pca"), require(stats, "mean", n, "feature_pca")
        t = max(stats.tokens, 2)
        return (gram - t * torch.outer(mean, mean)) / (t - 1)

    def decompose(self, weight: torch.Tensor, stats: InputStatistics | None = None) -> Decomposition:
        W = weight.detach().to(self.compute_dtype)
        m, n = W.shape
        Cx = self.input_covariance(stats, n).to(W)
        Cy = W @ Cx @ W.T
        evals, U = torch.linalg.eigh((Cy + Cy.T) / 2)
        k = min(m, n)
        evals, U = evals.flip(0)[:k].clamp(min=0), U.flip(1)[:, :k]
        mean_out = W @ require(stats, "mean", n, "feature_pca").to(W)
        return Decomposition(left=U, right=U.T @ W, spectrum=evals.sqrt(), offset=mean_out,
                             diagnostics={"pooled": self.pooled})
