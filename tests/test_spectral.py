"""The eigh route (Gram side) against the SVD route: same spectrum, same truncations, same loss,
to the bounds stated in lrc/factorizers/spectral.py, on every shape and conditioning."""

import pytest
import torch

from lrc.errors import ConfigError
from lrc.factorizers.asvd import ASVD
from lrc.factorizers.feature_pca import FeaturePCA
from lrc.factorizers.fwsvd import FWSVD
from lrc.factorizers.ressvd import ResSVD
from lrc.factorizers.spectral import left_singular
from lrc.factorizers.svd import PlainSVD
from lrc.factorizers.svdllm import SVDLLM
from tests.test_factorizers import correlated_inputs, loss, stats_of

# the contract table's factorizers (same names, same options), built for either route
FACTORIZERS = {
    "svd": (PlainSVD, {}),
    "svdllm-cholesky": (SVDLLM, {"whitening": "cholesky"}),
    "svdllm-eigh": (SVDLLM, {"whitening": "eigh"}),
    "asvd": (ASVD, {"alpha": 0.5}),
    "fwsvd": (FWSVD, {}),
    "feature_pca": (FeaturePCA, {"pooled": False}),
    "feature_pca-pooled": (FeaturePCA, {"pooled": True, "groups": 4}),
    "ressvd": (ResSVD, {}),
}

# eps of each precision; the tolerances below are small multiples of k x eps x σ_1²
EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7}


def with_spectrum(m: int, n: int, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=gen, dtype=torch.float64))
    return U @ torch.diag(sigma) @ V.T


def matrix(case: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    k = min(m, n)
    if case == "random":
        return torch.randn(m, n, generator=gen, dtype=torch.float64)
    if case == "ill_conditioned":  # σ from 1 down to 1e-12
        return with_spectrum(m, n, torch.logspace(0, -12, k, dtype=torch.float64), gen)
    if case == "rank_deficient":  # rank k // 3, the rest exactly zero
        sigma = torch.cat([torch.linspace(3, 1, k // 3, dtype=torch.float64), torch.zeros(k - k // 3)])
        return with_spectrum(m, n, sigma, gen)
    if case == "zero":
        return torch.zeros(m, n, dtype=torch.float64)
    raise ValueError(case)


CASES = ["random", "ill_conditioned", "rank_deficient", "zero"]
# square, wide (k/v under GQA, down_proj), tall (gate/up)
SHAPES = [(48, 48), (24, 72), (90, 30)]


def projection_loss(M: torch.Tensor, U: torch.Tensor) -> float:
    """||M - U Uᵀ M||², from scratch in float64."""
    M, U = M.double(), U.double()
    return float(((M - U @ (U.T @ M)) ** 2).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eigh_route_equals_svd_route(shape, case, dtype, rng):
    M = matrix(case, *shape, rng)
    k = min(shape)
    U_e, s_e = left_singular(M.to(dtype), "eigh")
    U_s, s_s = torch.linalg.svd(M, full_matrices=False)[:2]  # float64 reference
    top = float(s_s[0]) ** 2 if case != "zero" else 1.0
    tol = 50 * k * EPS[dtype] * top
    assert U_e.shape == (shape[0], k) and s_e.shape == (k,) and U_e.dtype == dtype
    assert torch.isfinite(U_e).all() and torch.isfinite(s_e).all()
    assert bool((s_e[:-1] >= s_e[1:]).all()), "spectrum not descending"
    # orthonormal basis: every truncation is a projection, even where σ is at round-off level
    torch.testing.assert_close(U_e.double().T @ U_e.double(), torch.eye(k, dtype=torch.float64),
                               atol=100 * k * EPS[dtype], rtol=0)
    # same spectrum: σ² to k eps σ_1²
    assert float((s_e.double() ** 2 - s_s ** 2).abs().max()) <= tol
    for r in (1, k // 3, k // 2, k - 1):
        # same loss: the discarded σ² of the reference, and the loss the basis really gives
        assert projection_loss(M, U_e[:, :r]) == pytest.approx(float((s_s[r:] ** 2).sum()), abs=tol)
        assert float((s_e[r:].double() ** 2).sum()) == pytest.approx(float((s_s[r:] ** 2).sum()), abs=tol)
        gap = float(s_s[r - 1] ** 2 - s_s[r] ** 2)
        if gap > 1e4 * tol:  # a resolved gap: the same rank-r truncation of M (Davis-Kahan)
            P_e = U_e[:, :r].double() @ (U_e[:, :r].double().T @ M)
            P_s = U_s[:, :r] @ (U_s[:, :r].T @ M)
            assert float(torch.linalg.matrix_norm(P_e - P_s)) <= 10 * tol / gap * float(s_s[0]) + 1e-12


def test_columns_limits_the_basis_not_the_spectrum(rng):
    for shape in SHAPES:
        M = matrix("random", *shape, rng)
        U, sigma = left_singular(M, "eigh", columns=5)
        U_all, sigma_all = left_singular(M, "eigh")
        assert U.shape == (shape[0], 5) and sigma.shape == (min(shape),)
        torch.testing.assert_close(sigma, sigma_all)
        torch.testing.assert_close(U @ U.T, U_all[:, :5] @ U_all[:, :5].T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_batched_equals_one_at_a_time(shape, rng):
    batch = torch.stack([matrix("random", *shape, rng) for _ in range(3)])
    U_b, s_b = left_singular(batch, "eigh", columns=7)
    for i in range(3):
        U, s = left_singular(batch[i], "eigh", columns=7)
        torch.testing.assert_close(s_b[i], s)
        torch.testing.assert_close(U_b[i] @ U_b[i].T, U @ U.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", FACTORIZERS)
@pytest.mark.parametrize("shape", [(24, 24), (8, 24), (40, 16)])
def test_every_factorizer_gives_the_same_truncation_by_either_route(name, shape, rng):
    """Spectrum, the factors' product and the loss on the data: eigh route == svd route."""
    W = torch.randn(*shape, generator=rng, dtype=torch.float64)
    X = correlated_inputs(shape[1], 300, rng)
    cls, options = FACTORIZERS[name]
    by_eigh = cls(**options).decompose(W, stats_of(X, shape[0]))
    reference = cls(**options, route="svd").decompose(W, stats_of(X, shape[0]))
    top = float(reference.spectrum[0]) ** 2
    torch.testing.assert_close(by_eigh.spectrum ** 2, reference.spectrum ** 2, atol=1e-11 * top, rtol=0)
    for rank in (1, min(shape) // 2, min(shape) - 1):
        B, A = by_eigh.factors(rank)
        Bs, As = reference.factors(rank)
        torch.testing.assert_close(B @ A, Bs @ As, atol=1e-8 * float(W.abs().max()), rtol=0)
        assert loss(name, W, B @ A, X) == pytest.approx(loss(name, W, Bs @ As, X), rel=1e-9, abs=1e-12 * top)


@pytest.mark.parametrize("name", FACTORIZERS)
def test_max_rank_keeps_only_the_columns_a_plan_can_use(name, rng):
    W = torch.randn(40, 16, generator=rng, dtype=torch.float64)
    X = correlated_inputs(16, 200, rng)
    cls, options = FACTORIZERS[name]
    full = cls(**options).decompose(W, stats_of(X, 40))
    limited = cls(**options).decompose(W, stats_of(X, 40), max_rank=6)
    assert limited.max_rank == 6 and limited.spectrum.numel() == 16
    torch.testing.assert_close(limited.spectrum, full.spectrum)
    B, A = limited.factors(6)
    Bf, Af = full.factors(6)
    torch.testing.assert_close(B @ A, Bf @ Af, atol=1e-9, rtol=0)
    with pytest.raises(ConfigError, match="rank=7"):
        limited.factors(7)


def test_bad_route_is_a_clear_error():
    with pytest.raises(ConfigError, match="route='qr'"):
        SVDLLM(route="qr")



def test_fallback_keeps_float32_where_it_is_exact_enough_and_recomputes_elsewhere(rng):
    flat = matrix("random", 60, 90, rng).float()  # flat spectrum: float32 resolves every tail
    U, sigma = left_singular(flat, "eigh", columns=20, fallback=True)
    assert U.dtype == sigma.dtype == torch.float32
    steep = matrix("ill_conditioned", 60, 90, rng)  # tails far below float32's resolution
    U, sigma = left_singular(steep.float(), "eigh", columns=20, fallback=True)
    assert U.dtype == sigma.dtype == torch.float64
    U_ref, sigma_ref = left_singular(steep.float().double(), "eigh", columns=20)
    assert torch.equal(sigma, sigma_ref) and torch.equal(U, U_ref)
    plain32 = left_singular(steep.float(), "eigh", columns=20)[0]
    assert plain32.dtype == torch.float32  # without fallback: what was asked for


@pytest.mark.parametrize("name", FACTORIZERS)
@pytest.mark.parametrize("case", ["random", "ill_conditioned"])
def test_every_factorizer_with_auto_precision_matches_float64(name, case, rng):
    """compute_dtype=auto: float32 where resolved, float64 elsewhere; the truncation is float64's.

    A model's weights are float32: both decompose the same float32 W. Working in float32 rounds
    W S once (error eps32 |W S|), so the loss may move by its first-order effect,
    2 sqrt(loss x energy) eps32, and no more."""
    W = matrix(case, 24, 36, rng).float()
    X = correlated_inputs(36, 300, rng)
    cls, options = FACTORIZERS[name]
    auto = cls(**options, compute_dtype="auto").decompose(W, stats_of(X, 24), max_rank=10)
    exact = cls(**options).decompose(W, stats_of(X, 24), max_rank=10)
    energy = loss(name, W.double(), torch.zeros(24, 36, dtype=torch.float64), X)
    for rank in (3, 10):
        B, A = auto.factors(rank)
        assert torch.isfinite(B).all() and torch.isfinite(A).all()
        Be, Ae = exact.factors(rank)
        want = loss(name, W.double(), Be @ Ae, X)
        got = loss(name, W.double(), B.double() @ A.double(), X)
        assert got == pytest.approx(want, rel=1e-4, abs=10 * EPS[torch.float32] * (want * energy) ** 0.5)
