"""The factorizer protocol.

A factorizer never sees the model: it gets one weight W (m x n, out x in) and the
statistics of that weight's input, and returns a :class:`Decomposition` that can be
truncated to any rank cheaply and exposes the spectrum it truncates in its own loss
metric (so every allocator works with every factorizer).

Every factorizer takes ``compute_dtype`` (float64 | float32 | auto: the precision of its
decomposition, auto being float32 where that is exact enough and float64 elsewhere;
statistics-side factorizations such as the whitening Cholesky stay float64)
and ``route`` (eigh | svd: how the decomposition is computed, see
:mod:`lrc.factorizers.spectral`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch

from lrc.errors import ConfigError
from lrc.factorizers.spectral import check_route, left_singular
from lrc.stats.types import InputStatistics

# compute_dtype -> the dtype a factorizer works in; "auto" works in float32 and decomposes again
# in float64 the matrices whose float32 spectrum is not exact enough (lrc.factorizers.spectral)
DTYPES = {"float64": torch.float64, "float32": torch.float32, "auto": torch.float32}


@dataclass
class Decomposition:
    """A matrix decomposed once: its rank-r truncation is ``left[:, :r] @ right[:r]``.

    ``spectrum`` (descending) holds the singular values in the factorizer's loss metric:
    the loss of truncating to rank r is ``sum(spectrum[r:] ** 2)``.
    """

    left: torch.Tensor  # m x k
    right: torch.Tensor  # k x n
    spectrum: torch.Tensor  # k
    diagnostics: dict[str, Any] = field(default_factory=dict)
    offset: torch.Tensor | None = None  # m: E[W x] whose discarded part becomes a bias (feature_pca)

    @property
    def max_rank(self) -> int:
        """The largest rank whose factors this decomposition holds (its spectrum may be longer)."""
        return self.left.shape[1]

    def factors(self, rank: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """B (m x rank) and A (rank x n) with B A the rank-``rank`` truncation."""
        self.check_rank(rank)
        B, A = self.left[:, :rank], self.right[:rank]
        if dtype is not None:
            B, A = B.to(dtype), A.to(dtype)
        return B.contiguous(), A.contiguous()

    def check_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.max_rank:
            raise ConfigError(f"rank={rank} is outside [1, {self.max_rank}] for a {self.shape} matrix")

    def bias_correction(self, rank: int) -> torch.Tensor | None:
        """(I - U_r U_rᵀ) E[W x]: added to the bias so the output mean is kept (orthonormal ``left``)."""
        if self.offset is None:
            return None
        U = self.left[:, :rank]
        return self.offset - U @ (U.T @ self.offset)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def truncation_error(self, rank: int) -> float:
        """Loss of the rank-``rank`` truncation in the factorizer's metric."""
        return float((self.spectrum[rank:].double() ** 2).sum())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to(self, device: torch.device | str) -> Decomposition:
        """This decomposition with every tensor moved to ``device`` (e.g. kept on the CPU)."""
        return replace(self, **{k: t.to(device) for k, t in self._tensors().items()})

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}


class Factorizer(ABC):
    """Decomposes one weight given its input statistics.

    ``needs`` names the statistics kinds the pipeline must collect for it
    (``"gram"``: the input Gram matrix).
    """

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, compute_dtype: str = "float64", route: str = "eigh") -> None:
        if compute_dtype not in DTYPES:
            raise ConfigError(f"compute_dtype={compute_dtype!r} is not one of {sorted(DTYPES)}")
        self.compute_dtype = DTYPES[compute_dtype]
        self.fallback = compute_dtype == "auto"  # float64 where float32 is not exact enough
        self.route = check_route(route)

    @abstractmethod
    def decompose(self, weight: torch.Tensor, stats: InputStatistics | None = None,
                  max_rank: int | None = None) -> Decomposition:
        """Decompose ``weight`` (m x n) once; truncate later with ``Decomposition.factors``.

        ``max_rank``: the largest rank the factors will be asked for (None: every rank up to
        min(m, n)); the spectrum is always complete.
        """

    def projection(self, scaled: torch.Tensor, weight: torch.Tensor, max_rank: int | None,
                   diagnostics: dict[str, Any] | None = None) -> Decomposition:
        """W onto the left singular vectors of its input-scaled form ``scaled`` = W S (see
        :func:`projection_decomposition`), computed by this factorizer's route."""
        basis, spectrum = left_singular(scaled, self.route, max_rank, self.fallback)
        return projection_decomposition(weight, basis, spectrum, self.noted(diagnostics, basis))

    def noted(self, diagnostics: dict[str, Any] | None, basis: torch.Tensor) -> dict[str, Any]:
        """``diagnostics``, plus whether compute_dtype=auto fell back to float64 for this matrix."""
        diagnostics = dict(diagnostics or {})
        if self.fallback:
            diagnostics["float64_fallback"] = basis.dtype == torch.float64
        return diagnostics

    def added_params(self, shape: tuple[int, int], has_bias: bool) -> int:
        """Parameters a factorized ``shape`` matrix stores beyond its two factors (counted in the budget)."""
        return 0

    def describe(self) -> dict[str, Any]:
        """Plain-data identity of this factorizer and its options."""
        return {"name": type(self).__name__,
                **{k: v.describe() if isinstance(v, Factorizer) else str(v) for k, v in vars(self).items()}}


def projection_decomposition(weight: torch.Tensor, basis: torch.Tensor, spectrum: torch.Tensor,
                             diagnostics: dict[str, Any] | None = None) -> Decomposition:
    """W_r = U_r U_rᵀ W for an orthonormal output basis U (m x r <= k): left = U, right = Uᵀ W.

    Plain SVD, ASVD and SVD-LLM all truncate this way (U = left singular vectors of W S
    for their input scaling S); writing it as a projection needs no S^-1, so an
    ill-conditioned or singular S cannot produce huge or non-finite factors.
    """
    W = weight.to(basis.dtype)
    return Decomposition(left=basis, right=basis.T @ W, spectrum=spectrum, diagnostics=diagnostics or {})


def require(stats: InputStatistics | None, field_name: str, size: int, who: str) -> torch.Tensor:
    """The statistic ``field_name`` of ``stats``, checked to match the weight (size = its leading dim)."""
    value = getattr(stats, field_name, None) if stats is not None else None
    if value is None:
        raise ConfigError(f"{who} needs the {field_name} statistic, but it was not collected")
    if value.shape[0] != size:
        raise ConfigError(f"{who}: {field_name} of shape {tuple(value.shape)} does not match the weight ({size})")
    return value


def require_gram(stats: InputStatistics | None, n: int, who: str) -> torch.Tensor:
    return require(stats, "gram", n, who)


def check_shrinkage(value: float) -> float:
    """A shrinkage weight must lie in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"shrinkage={value!r} must be a number in [0, 1] (0: the calibration matrix as measured)")
    return float(value)


def shrink_to_diagonal(matrix: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """G_λ = (1 - λ) G + λ diag(G): the input's second moments kept, its correlations damped.

    λ = 0 is the calibration matrix as measured (the data-aware optimum on the calibration
    text); λ = 1 keeps only each channel's energy (a per-channel scaling, as ASVD's). In between
    trades fit to the calibration text for robustness on other text (Ledoit-Wolf-style
    shrinkage towards the diagonal target). G_λ is positive semi-definite whenever G is.
    """
    if shrinkage == 0.0:
        return matrix
    shrunk = matrix * (1.0 - shrinkage)
    torch.diagonal(shrunk).copy_(torch.diagonal(matrix))
    return shrunk
