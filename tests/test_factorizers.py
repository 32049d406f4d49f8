"""Contract tests shared by every factorizer (one table of cases)."""

import pytest
import torch

from lrc.errors import ConfigError
from lrc.factorizers.base import InputStatistics
from lrc.factorizers.svd import PlainSVD
from lrc.factorizers.svdllm import SVDLLM

FACTORIZERS = {
    "svd": lambda: PlainSVD(),
    "svdllm-cholesky": lambda: SVDLLM(whitening="cholesky"),
    "svdllm-eigh": lambda: SVDLLM(whitening="eigh"),
}
# (out, in): square, wide (k/v under GQA: fewer rows), tall (gate/up)
SHAPES = [(24, 24), (8, 24), (40, 16)]


def correlated_inputs(n: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, -2, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ (mix * scales)


def stats_of(X: torch.Tensor) -> InputStatistics:
    return InputStatistics(tokens=X.shape[0], gram=X.T @ X)


def loss(name: str, W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """The objective each factorizer's spectrum is measured in."""
    if name == "svd":
        return float(((W - W_hat) ** 2).sum())
    return float((((W - W_hat) @ X.T) ** 2).sum())


@pytest.mark.parametrize("name", FACTORIZERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_reconstructs_weight(name, shape, rng):
    W = torch.randn(*shape, generator=rng, dtype=torch.float64)
    X = correlated_inputs(shape[1], 200, rng)
    dec = FACTORIZERS[name]().decompose(W, stats_of(X))
    B, A = dec.factors(min(shape))
    torch.testing.assert_close(B @ A, W, rtol=1e-9, atol=1e-9)
    assert dec.truncation_error(min(shape)) == 0.0


@pytest.mark.parametrize("name", FACTORIZERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_truncation_error_equals_discarded_spectrum(name, shape, rng):
    W = torch.randn(*shape, generator=rng, dtype=torch.float64)
    X = correlated_inputs(shape[1], 300, rng)
    dec = FACTORIZERS[name]().decompose(W, stats_of(X))
    for rank in (1, min(shape) // 2, min(shape) - 1):
        B, A = dec.factors(rank)
        assert B.shape == (shape[0], rank) and A.shape == (rank, shape[1])
        assert torch.isfinite(B).all() and torch.isfinite(A).all()
        measured = loss(name, W, B @ A, X)
        assert measured == pytest.approx(dec.truncation_error(rank), rel=1e-6)
        assert dec.truncation_error(rank) == pytest.approx(float((dec.spectrum[rank:] ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("name", [n for n in FACTORIZERS if n != "svd"])
def test_whitened_truncation_beats_plain_svd_on_its_objective(name, rng):
    W = torch.randn(24, 24, generator=rng, dtype=torch.float64)
    X = correlated_inputs(24, 300, rng)
    whitened = FACTORIZERS[name]().decompose(W, stats_of(X))
    plain = PlainSVD().decompose(W, stats_of(X))
    for rank in (4, 12):
        Bw, Aw = whitened.factors(rank)
        Bp, Ap = plain.factors(rank)
        assert loss(name, W, Bw @ Aw, X) < loss(name, W, Bp @ Ap, X)


def gram_cases(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    X = torch.randn(n // 3, n, generator=gen, dtype=torch.float64)  # fewer tokens than inputs
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    evals = torch.linspace(1, -1e-3, n, dtype=torch.float64)
    return {
        "rank_deficient": X.T @ X,
        "dead_channels": torch.block_diag(X[:, : n // 2].T @ X[:, : n // 2], torch.zeros(n - n // 2, n - n // 2,
                                                                                          dtype=torch.float64)),
        "indefinite": Q @ torch.diag(evals) @ Q.T,
        "zero": torch.zeros(n, n, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", FACTORIZERS)
@pytest.mark.parametrize("case", ["rank_deficient", "dead_channels", "indefinite", "zero"])
def test_singular_or_indefinite_gram_gives_finite_factors(name, case, rng):
    n = 24
    W = torch.randn(16, n, generator=rng, dtype=torch.float64)
    G = gram_cases(n, rng)[case]
    dec = FACTORIZERS[name]().decompose(W, InputStatistics(tokens=8, gram=G))
    for rank in (1, 8, 16):
        B, A = dec.factors(rank)
        assert torch.isfinite(B).all() and torch.isfinite(A).all()
        assert torch.linalg.matrix_norm(B @ A) <= torch.linalg.matrix_norm(W) * (1 + 1e-9)  # a projection of W
    assert torch.isfinite(dec.spectrum).all()


def test_rank_deficient_gram_still_optimal_on_the_data(rng):
    """W' = U_r U_rᵀ W is the optimum even when G is singular; error = discarded σ² exactly."""
    W = torch.randn(16, 24, generator=rng, dtype=torch.float64)
    X = torch.randn(10, 24, generator=rng, dtype=torch.float64)
    for route in ("cholesky", "eigh"):
        dec = SVDLLM(whitening=route).decompose(W, stats_of(X))
        B, A = dec.factors(5)
        assert loss("svdllm", W, B @ A, X) == pytest.approx(dec.truncation_error(5), rel=1e-6, abs=1e-9)


def test_cholesky_damping_is_recorded(rng):
    X = torch.randn(5, 24, generator=rng, dtype=torch.float64)
    dec = SVDLLM(whitening="cholesky").decompose(torch.randn(8, 24, dtype=torch.float64), stats_of(X))
    assert dec.diagnostics["damping"] > 0
    full = correlated_inputs(24, 200, rng)
    assert SVDLLM().decompose(torch.randn(8, 24, dtype=torch.float64), stats_of(full)).diagnostics["damping"] == 0


def test_whitening_shared_by_linears_of_one_input(rng):
    stats = stats_of(correlated_inputs(24, 100, rng))
    fac = SVDLLM()
    fac.decompose(torch.randn(8, 24, dtype=torch.float64), stats)
    fac.decompose(torch.randn(16, 24, dtype=torch.float64), stats)
    assert len(stats.derived) == 1


def test_float32_weight_gives_float32_factors_on_request(rng):
    W = torch.randn(12, 20, generator=rng)
    dec = SVDLLM().decompose(W, stats_of(correlated_inputs(20, 64, rng)))
    B, A = dec.factors(4, dtype=torch.float32)
    assert B.dtype == A.dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    ({"whitening": "qr"}, "whitening"),
    ({"damping": -1.0}, "damping"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SVDLLM(**kwargs)


def test_missing_statistics_is_a_clear_error():
    with pytest.raises(ConfigError, match="Gram"):
        SVDLLM().decompose(torch.randn(4, 4))


def test_rank_outside_range_is_a_clear_error(rng):
    dec = PlainSVD().decompose(torch.randn(4, 6, generator=rng))
    with pytest.raises(ConfigError, match="rank=5"):
        dec.factors(5)
