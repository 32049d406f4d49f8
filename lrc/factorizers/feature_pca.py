"""Output-feature PCA, Bolaco's factorization (arXiv 2405.10616).

With the covariance C_y of the layer's outputs, C_y = U Λ Uᵀ, keep the top-r principal
directions: B = U_r, A = U_rᵀ W, and a bias b = (I - U_r U_rᵀ) E[y] so the output mean is
preserved. The loss is E||(I - U_r U_rᵀ)(y - E y)||², the sum of discarded eigenvalues
(the spectrum holds their square roots).

For a linear layer y = W x + b the output statistics follow exactly from the input's:
C_y = W C_x Wᵀ and E[y] = W E[x] + b. So one input covariance per shared input (q/k/v,
gate/up) serves every linear reading it, instead of an m x m matrix per linear.
With a square root R Rᵀ = C_x (from the eigendecomposition of C_x, negative round-off
eigenvalues clamped to zero; float64, shared by the linears of one input), U and the spectrum
are the left singular vectors and singular values of W R, computed by the factorizer's route
(the eigh route takes the smaller side: (W R)(W R)ᵀ = C_y when m <= n, Rᵀ Wᵀ W R when m > n).
``pooled`` (the paper's) uses the pooled covariance over ``groups`` contiguous groups of
calibration tokens (the mean of per-group sample covariances); ``pooled: false`` uses the
plain sample covariance. ``shrinkage`` λ uses C_λ = (1 - λ) C_x + λ diag(C_x) instead
(:func:`~lrc.factorizers.base.shrink_to_diagonal`).
"""

from __future__ import annotations

import torch

from lrc.errors import ConfigError
from lrc.factorizers.base import Decomposition, Factorizer, check_shrinkage, require, shrink_to_diagonal
from lrc.factorizers.spectral import left_singular
from lrc.stats.types import InputStatistics


class FeaturePCA(Factorizer):
    def __init__(self, pooled: bool = True, groups: int = 32, compute_dtype: str = "float64",
                 route: str = "eigh", shrinkage: float = 0.0) -> None:
        super().__init__(compute_dtype, route)
        if not isinstance(groups, int) or groups < 1:
            raise ConfigError(f"groups={groups!r} must be a positive integer")
        self.pooled, self.groups = bool(pooled), groups
        self.shrinkage = check_shrinkage(shrinkage)

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

    def covariance_root(self, stats: InputStatistics, W: torch.Tensor) -> torch.Tensor:
        """R with R Rᵀ = C_x (in W's dtype), computed once per input through ``stats.derived``."""
        key = f"covariance_root:{self.pooled}:{self.groups}:{self.shrinkage}:{W.dtype}:{W.device}"
        if key not in stats.derived:
            Cx = self.input_covariance(stats, W.shape[1]).to(device=W.device, dtype=torch.float64)
            Cx = shrink_to_diagonal(Cx, self.shrinkage)
            evals, Q = torch.linalg.eigh((Cx + Cx.T) / 2)
            stats.derived[key] = (Q * evals.clamp(min=0).sqrt()).to(W.dtype)
        return stats.derived[key]

    def decompose(self, weight: torch.Tensor, stats: InputStatistics | None = None,
                  max_rank: int | None = None) -> Decomposition:
        W = weight.detach().to(self.compute_dtype)
        mean_out = W @ require(stats, "mean", W.shape[1], "feature_pca").to(W)
        U, sigma = left_singular(W @ self.covariance_root(stats, W), self.route, max_rank, self.fallback)
        W, mean_out = W.to(U.dtype), mean_out.to(U.dtype)  # float64 where auto fell back
        return Decomposition(left=U, right=U.T @ W, spectrum=sigma, offset=mean_out,
                             diagnostics=self.noted({"pooled": self.pooled}, U))
