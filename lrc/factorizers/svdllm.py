"""SVD-LLM: truncation-aware data whitening (Wang et al., 2024, arXiv 2403.07378).

With the input Gram G = Xᵀ X = S Sᵀ, SVD-LLM truncates the SVD of W S:
W S = U Σ Vᵀ and W' = U_r Σ_r V_rᵀ S⁻¹ = U_r U_rᵀ W. Then

    ||(W - W') Xᵀ||_F² = sum_{i > r} σ_i²,

the optimum of the data-aware objective. We compute W' in the projection form
U_r U_rᵀ W, which needs no S⁻¹: it stays finite and exact even when G is singular.

The whitening factor S comes from either route (option ``whitening``):

* ``cholesky`` (the paper's): G = L Lᵀ. Where G is not numerically positive definite
  (rank-deficient calibration, dead channels), ``damping`` relative to mean(diag G)
  is added and multiplied by 10 until the factorization succeeds (the papers' own code
  fails there; SVD-LLM issues #6, #7, #24, #52).
* ``eigh``: G = Q Λ Qᵀ, S = Q Λ^{1/2} with eigenvalues floored at ``damping`` x
  mean(diag G) (negative round-off eigenvalues are clamped to that floor).

Every damping applied is recorded in the decomposition's ``diagnostics``.

``shrinkage`` λ whitens with G_λ = (1 - λ) G + λ diag(G) instead of G
(:func:`~lrc.factorizers.base.shrink_to_diagonal`): the truncation is then optimal for
||(W - W') S_λ||_F, which fits the calibration text less and other text better (issue 18).
"""

from __future__ import annotations

from typing import Any

import torch

from lrc.errors import ConfigError, NumericalError
from lrc.factorizers.base import Decomposition, Factorizer, check_shrinkage, require_gram, shrink_to_diagonal
from lrc.stats.types import InputStatistics

ROUTES = ("cholesky", "eigh")


class SVDLLM(Factorizer):
    needs = frozenset({"gram"})

    def __init__(self, whitening: str = "cholesky", damping: float = 0.0, first_damping: float = 1e-10,
                 max_damping: float = 1.0, compute_dtype: str = "float64", route: str = "eigh",
                 shrinkage: float = 0.0) -> None:
        super().__init__(compute_dtype, route)
        if whitening not in ROUTES:
            raise ConfigError(f"whitening={whitening!r} is not one of {ROUTES}")
        for key, value in (("damping", damping), ("first_damping", first_damping), ("max_damping", max_damping)):
            if not value >= 0:
                raise ConfigError(f"{key}={value!r} must be >= 0")
        if not 0 < first_damping <= max_damping:
            raise ConfigError(f"first_damping={first_damping} must be in (0, max_damping={max_damping}]")
        self.whitening, self.damping = whitening, float(damping)
        self.first_damping, self.max_damping = float(first_damping), float(max_damping)
        self.shrinkage = check_shrinkage(shrinkage)

    def decompose(self, weight: torch.Tensor, stats: InputStatistics | None = None,
                  max_rank: int | None = None) -> Decomposition:
        W = weight.detach().to(self.compute_dtype)
        S, diagnostics = self.shared_whitening(stats, W)
        return self.projection(W @ S, W, max_rank, dict(diagnostics))

    def shared_whitening(self, stats: InputStatistics | None, W: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """S for this input (in W's dtype), computed once and shared by q/k/v (gate/up) through
        ``stats.derived``. The factorization of G is always float64, as the damping rules need."""
        G = require_gram(stats, W.shape[1], "whitening")
        key = f"whitening:{self.whitening}:{self.damping}:{self.first_damping}:{self.shrinkage}:{W.dtype}:{W.device}"
        if key not in stats.derived:
            G = shrink_to_diagonal(G.to(device=W.device, dtype=torch.float64), self.shrinkage)
            S, diagnostics = self.whitening_factor(G)
            stats.derived[key] = S.to(W.dtype), diagnostics
        return stats.derived[key]

    def whitening_factor(self, G: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """S with S Sᵀ = G (+ damping), and what was done to get it."""
        if not torch.isfinite(G).all():
            raise NumericalError("svdllm: the input Gram matrix has non-finite entries (activations overflowed?)")
        scale = float(torch.diagonal(G).mean())
        n = G.shape[0]
        if scale <= 0.0:  # the input never fired: no data direction to prefer
            return torch.eye(n, dtype=G.dtype, device=G.device), {"whitening": "identity", "damping": None}
        if self.whitening == "eigh":
            evals, Q = torch.linalg.eigh(G)
            floor = self.damping * scale
            clamped = int((evals < floor).sum())
            S = Q * evals.clamp(min=floor).sqrt()
            return S, {"whitening": "eigh", "damping": self.damping, "clamped_eigenvalues": clamped}
        damping, damped, diagonal = self.damping, None, torch.diagonal(G)
        while True:
            if damping:  # G + damping x scale x I, its diagonal set in place on one copy
                damped = G.clone() if damped is None else damped
                torch.diagonal(damped).copy_(diagonal + damping * scale)
            L, info = torch.linalg.cholesky_ex(damped if damping else G)
            if int(info) == 0:  # G is finite (checked above), so a successful L is too
                return L, {"whitening": "cholesky", "damping": damping}
            if damping >= self.max_damping:
                raise NumericalError(
                    f"svdllm: Cholesky of the input Gram failed even with damping {damping:g} x mean(diag G); "
                    "try factorizer.whitening=eigh"
                )
            damping = self.first_damping if damping < self.first_damping else min(damping * 10, self.max_damping)
