"""Contract tests shared by every factorizer (one table of cases)."""

import json

import pytest
import torch

from lrc.errors import ConfigError
from lrc.factorizers.asvd import ASVD
from lrc.factorizers.feature_pca import FeaturePCA
from lrc.factorizers.fwsvd import FWSVD
from lrc.factorizers.ressvd import ResSVD
from lrc.factorizers.svd import PlainSVD
from lrc.factorizers.svdllm import SVDLLM
from lrc.stats.types import InputStatistics

SHRINKAGE = 0.4  # the *-shrunk cases: G_λ = (1 - λ) G + λ diag(G)
FACTORIZERS = {
    "svd": lambda: PlainSVD(),
    "svdllm-cholesky": lambda: SVDLLM(whitening="cholesky"),
    "svdllm-eigh": lambda: SVDLLM(whitening="eigh"),
    "asvd": lambda: ASVD(alpha=0.5),
    "fwsvd": lambda: FWSVD(),
    "feature_pca": lambda: FeaturePCA(pooled=False),
    "feature_pca-pooled": lambda: FeaturePCA(pooled=True, groups=4),
    "ressvd": lambda: ResSVD(),
    "svdllm-shrunk": lambda: SVDLLM(whitening="eigh", shrinkage=SHRINKAGE),
    "feature_pca-shrunk": lambda: FeaturePCA(pooled=False, shrinkage=SHRINKAGE),
}
# where theory says the loss of a rank-r truncation is the sum of discarded squared spectrum values
EXACT_SPECTRUM = [n for n in FACTORIZERS if n != "ressvd"]
# (out, in): square, wide (k/v under GQA: fewer rows), tall (gate/up)
SHAPES = [(24, 24), (8, 24), (40, 16)]


def correlated_inputs(n: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, -2, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ (mix * scales)


def pooled_by_hand(X: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of the per-group sample covariances of `groups` contiguous token groups."""
    T = X.shape[0]
    bounds = [g * T // groups for g in range(groups + 1)]
    return torch.stack([torch.cov(X[a:b].T) for a, b in zip(bounds, bounds[1:], strict=False)]).mean(0)


def stats_of(X: torch.Tensor, m: int | None = None) -> InputStatistics:
    """Every statistic a factorizer may ask for, computed directly from the inputs X (T x n)."""
    fisher = None
    if m is not None:
        fisher = torch.linspace(0.1, 3.0, m, dtype=torch.float64) ** 2
    return InputStatistics(tokens=X.shape[0], gram=X.T @ X, mean_abs=X.abs().mean(0), mean=X.mean(0),
                           pooled_cov=pooled_by_hand(X, 4) if X.shape[0] >= 8 else None, fisher=fisher)


def shrunk_by_hand(C: torch.Tensor) -> torch.Tensor:
    """(1 - λ) C + λ diag(C), entry by entry."""
    n = C.shape[0]
    return torch.tensor([[C[i, j] if i == j else (1 - SHRINKAGE) * C[i, j] for j in range(n)] for i in range(n)],
                        dtype=C.dtype)


def loss(name: str, W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """The objective each factorizer's spectrum is measured in, computed from scratch."""
    diff = W - W_hat
    if name == "svdllm-shrunk":
        return float(torch.trace(diff @ shrunk_by_hand(X.T @ X) @ diff.T))
    if name == "feature_pca-shrunk":
        return float(torch.trace(diff @ shrunk_by_hand(torch.cov(X.T)) @ diff.T))
    if name == "svd":
        return float((diff ** 2).sum())
    if name == "asvd":
        return float(((diff * X.abs().mean(0).sqrt()) ** 2).sum())
    if name == "fwsvd":
        return float(((torch.linspace(0.1, 3.0, W.shape[0], dtype=torch.float64)[:, None] * diff) ** 2).sum())
    if name == "feature_pca":
        return float(((diff @ (X - X.mean(0)).T) ** 2).sum()) / (X.shape[0] - 1)
    if name == "feature_pca-pooled":
        return float(torch.trace(diff @ pooled_by_hand(X, 4) @ diff.T))
    return float(((diff @ X.T) ** 2).sum())  # whitened: ||(W - W') Xᵀ||²


@pytest.mark.parametrize("name", FACTORIZERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_reconstructs_weight(name, shape, rng):
    W = torch.randn(*shape, generator=rng, dtype=torch.float64)
    X = correlated_inputs(shape[1], 200, rng)
    dec = FACTORIZERS[name]().decompose(W, stats_of(X, shape[0]))
    B, A = dec.factors(min(shape))
    torch.testing.assert_close(B @ A, W, rtol=1e-9, atol=1e-9)
    assert dec.truncation_error(min(shape)) == pytest.approx(0.0, abs=1e-12 * float((W ** 2).sum()))


@pytest.mark.parametrize("name", EXACT_SPECTRUM)
@pytest.mark.parametrize("shape", SHAPES)
def test_truncation_error_equals_discarded_spectrum(name, shape, rng):
    W = torch.randn(*shape, generator=rng, dtype=torch.float64)
    X = correlated_inputs(shape[1], 300, rng)
    dec = FACTORIZERS[name]().decompose(W, stats_of(X, shape[0]))
    for rank in (1, min(shape) // 2, min(shape) - 1):
        B, A = dec.factors(rank)
        assert B.shape == (shape[0], rank) and A.shape == (rank, shape[1])
        assert torch.isfinite(B).all() and torch.isfinite(A).all()
        measured = loss(name, W, B @ A, X)
        assert measured == pytest.approx(dec.truncation_error(rank), rel=1e-6)
        assert dec.truncation_error(rank) == pytest.approx(float((dec.spectrum[rank:] ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("name", [n for n in EXACT_SPECTRUM if n != "svd"])
def test_data_aware_truncation_beats_plain_svd_on_its_objective(name, rng):
    W = torch.randn(24, 24, generator=rng, dtype=torch.float64)
    X = correlated_inputs(24, 300, rng)
    whitened = FACTORIZERS[name]().decompose(W, stats_of(X, 24))
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
    degenerate = torch.zeros(n, dtype=torch.float64) if case == "zero" else torch.diagonal(G).clamp(min=0).sqrt()
    stats = InputStatistics(tokens=8, gram=G, mean_abs=degenerate, mean=degenerate, pooled_cov=G,
                            fisher=torch.zeros(16, dtype=torch.float64) if case == "zero" else degenerate[:16])
    dec = FACTORIZERS[name]().decompose(W, stats)
    for rank in (1, 8, 16):
        B, A = dec.factors(rank)
        assert torch.isfinite(B).all() and torch.isfinite(A).all()
        if name != "fwsvd":  # fwsvd's row weighting is not a projection
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
    with pytest.raises(ConfigError, match="gram statistic"):
        SVDLLM().decompose(torch.randn(4, 4))


def test_rank_outside_range_is_a_clear_error(rng):
    dec = PlainSVD().decompose(torch.randn(4, 6, generator=rng))
    with pytest.raises(ConfigError, match="rank=5"):
        dec.factors(5)


def test_ressvd_same_metric_equals_single_truncation(rng):
    """Eckart-Young: two stages in one metric are one rank-(r1 + r2) truncation (float64, 1e-8)."""
    W = torch.randn(40, 56, generator=rng, dtype=torch.float64)
    stats = stats_of(correlated_inputs(56, 400, rng))
    for metric, single in (("whitened", SVDLLM()), ("plain", PlainSVD())):
        two_stage = ResSVD(beta=0.2, stage1=metric, stage2=metric).decompose(W, stats)
        one = single.decompose(W, stats)
        for rank in (6, 20, 39):
            assert two_stage.split(rank)[1] > 0
            B, A = two_stage.factors(rank)
            Bs, As = one.factors(rank)
            assert torch.linalg.matrix_norm(B @ A - Bs @ As) <= 1e-8 * torch.linalg.matrix_norm(Bs @ As)


def test_ressvd_mixed_metrics_differ_from_single_truncation(rng):
    W = torch.randn(40, 56, generator=rng, dtype=torch.float64)
    X = correlated_inputs(56, 400, rng)
    stats = stats_of(X)
    mixed = ResSVD().decompose(W, stats)  # paper default: whitened stage 1, plain residual
    B, A = mixed.factors(20)
    Bs, As = SVDLLM().decompose(W, stats).factors(20)
    assert torch.linalg.matrix_norm(B @ A - Bs @ As) > 1e-3 * torch.linalg.matrix_norm(Bs @ As)
    assert mixed.split(20) == (20 - round(0.05 * 40 * 56 / 96), round(0.05 * 40 * 56 / 96))
    assert B.shape == (40, 20) and A.shape == (20, 56)
    # the reported error is the combined truncation's, in stage 1's (whitened) metric
    assert mixed.truncation_error(20) == pytest.approx(loss("svdllm", W, B @ A, X), rel=1e-8)


def test_feature_pca_full_rank_reproduces_outputs_on_calibration_data(rng):
    W = torch.randn(16, 24, generator=rng, dtype=torch.float64)
    X = correlated_inputs(24, 300, rng) + 0.5  # non-zero mean
    for pooled in (True, False):
        dec = FeaturePCA(pooled=pooled, groups=4).decompose(W, stats_of(X))
        B, A = dec.factors(16)
        torch.testing.assert_close(X @ A.T @ B.T + dec.bias_correction(16), X @ W.T, rtol=1e-9, atol=1e-9)


def test_feature_pca_bias_keeps_the_output_mean(rng):
    W = torch.randn(16, 24, generator=rng, dtype=torch.float64)
    X = correlated_inputs(24, 300, rng) + 2.0
    dec = FeaturePCA(pooled=False).decompose(W, stats_of(X))
    B, A = dec.factors(5)
    approx = X @ A.T @ B.T + dec.bias_correction(5)
    torch.testing.assert_close(approx.mean(0), (X @ W.T).mean(0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("factory, match", [
    (lambda: ASVD(alpha=-0.5), "alpha=-0.5"),
    (lambda: ResSVD(beta=1.0), "beta=1.0"),
    (lambda: ResSVD(beta=-0.1), "beta=-0.1"),
    (lambda: ResSVD(stage2="fisher"), "stage2='fisher'"),
    (lambda: FeaturePCA(groups=0), "groups=0"),
    (lambda: FWSVD(floor=2.0), "floor=2.0"),
    (lambda: SVDLLM(shrinkage=1.5), "shrinkage=1.5"),
    (lambda: FeaturePCA(shrinkage=-0.1), "shrinkage=-0.1"),
    (lambda: ResSVD(shrinkage="all"), "shrinkage='all'"),
])
def test_bad_method_options_are_clear_errors(factory, match):
    with pytest.raises(ConfigError, match=match):
        factory()


def test_describe_is_plain_data_that_identifies_the_options():
    """A factorizer's identity goes into cache keys: equal options, equal descriptions (no object addresses)."""
    assert ResSVD().describe() == ResSVD().describe()
    assert "object at 0x" not in json.dumps(ResSVD().describe())
    assert ResSVD(beta=0.1).describe() != ResSVD().describe()
    for make in (SVDLLM, ResSVD, FeaturePCA):  # shrinkage changes the result, so the cache keys
        assert make(shrinkage=0.2).describe() != make().describe()


def test_full_shrinkage_is_per_channel_scaling(rng):
    """λ = 1 keeps only each input channel's energy: the optimum of ||(W - W') D||_F with
    D = diag(sqrt(G_ii)), i.e. the plain SVD of W D mapped back (a scaling-only method, as ASVD's)."""
    W = torch.randn(12, 20, generator=rng, dtype=torch.float64)
    X = correlated_inputs(20, 200, rng)
    D = torch.diag((X ** 2).sum(0).sqrt())
    dec = SVDLLM(whitening="eigh", shrinkage=1.0).decompose(W, stats_of(X))
    U, s, Vh = torch.linalg.svd(W @ D, full_matrices=False)
    for rank in (3, 8):
        B, A = dec.factors(rank)
        torch.testing.assert_close(B @ A, U[:, :rank] @ (U[:, :rank].T @ W), rtol=1e-9, atol=1e-9)
        assert dec.truncation_error(rank) == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-9)


def test_shrinkage_trades_calibration_fit_monotonically(rng):
    """More shrinkage: a worse fit to the calibration inputs (the λ = 0 plan is their optimum),
    a better fit in the plain weight metric."""
    W = torch.randn(24, 24, generator=rng, dtype=torch.float64)
    X = correlated_inputs(24, 300, rng)
    on_data, on_weight = [], []
    for lam in (0.0, 0.3, 1.0):
        B, A = SVDLLM(whitening="eigh", shrinkage=lam).decompose(W, stats_of(X)).factors(8)
        on_data.append(loss("svdllm-eigh", W, B @ A, X))
        on_weight.append(loss("svd", W, B @ A, X))
    assert on_data[0] < on_data[1] < on_data[2]
    assert on_weight[0] > on_weight[2]
