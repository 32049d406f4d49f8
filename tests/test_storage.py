"""Compact statistics on disk: upper triangles in the chosen precision, identical results whether a
run computed its statistics or read them back, and nothing written when a run asks for that."""

import pytest
import torch

from lrc.errors import ConfigError
from lrc.stats.cache import StatisticsCache
from lrc.stats.storage import StatisticsStorage, from_triangle, stored_bytes
from lrc.stats.types import InputStatistics


def statistics(rng, n=37) -> dict[str, InputStatistics]:
    x = torch.randn(200, n, generator=rng, dtype=torch.float64) * torch.logspace(0, -4, n, dtype=torch.float64)
    return {"a": InputStatistics(tokens=200, gram=x.T @ x, mean=x.mean(0), pooled_cov=torch.cov(x.T)),
            "b": InputStatistics(tokens=200, mean_abs=x.abs().mean(0))}


@pytest.mark.parametrize("precision, dtype", [("float64", torch.float64), ("float32", torch.float32)])
def test_stored_form_is_the_triangle_rounded_to_the_precision(precision, dtype, rng):
    stats = statistics(rng)
    storage = StatisticsStorage(precision=precision, codec="none")
    tensors = storage.pack(stats)
    n = stats["a"].gram.shape[0]
    assert tensors["a/gram:triu"].shape == (n * (n + 1) // 2,) and tensors["a/gram:triu"].dtype == dtype
    assert tensors["a/mean"].dtype == torch.float64  # vectors stay float64
    back = storage.unpack(tensors, {"a": 200, "b": 200})
    for name in ("gram", "pooled_cov"):
        G, R = getattr(stats["a"], name), getattr(back["a"], name)
        assert R.dtype == torch.float64 and torch.equal(R, R.T)
        assert torch.equal(R, G.to(dtype).double())  # each entry rounded once, nothing else changed
    assert torch.equal(back["a"].mean, stats["a"].mean) and torch.equal(back["b"].mean_abs, stats["b"].mean_abs)


def test_from_triangle_rejects_a_length_that_is_no_triangle():
    assert torch.equal(from_triangle(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([[1.0, 2.0], [2.0, 3.0]]).double())
    with pytest.raises(ValueError, match="4 values"):
        from_triangle(torch.ones(4))


@pytest.mark.parametrize("write", [True, False])
def test_computed_and_read_back_statistics_are_identical(write, tmp_path, rng):
    stats = statistics(rng)
    calls = []

    def compute(kinds):
        calls.append(kinds)
        return stats

    cache = StatisticsCache(tmp_path, StatisticsStorage("float32", write=write))
    first, cached = cache.get_or_compute({"m": 1}, frozenset({"gram", "mean"}), compute)
    assert cached == frozenset()
    second, cached = StatisticsCache(tmp_path, StatisticsStorage("float32", write=write)).get_or_compute(
        {"m": 1}, frozenset({"gram", "mean"}), compute)
    assert torch.equal(first["a"].gram, second["a"].gram) and torch.equal(first["a"].mean, second["a"].mean)
    assert torch.equal(first["a"].gram, stats["a"].gram.float().double())  # the run that computed them rounded too
    files = list((tmp_path / "stats").glob("*.safetensors"))
    if write:
        assert cached == frozenset({"gram", "mean"}) and len(calls) == 1 and len(files) == 2
    else:
        assert cached == frozenset() and len(calls) == 2 and files == []


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_compressed_triangle_is_lossless_and_smaller(precision, rng):
    stats = statistics(rng, n=200)
    plain = StatisticsStorage(precision=precision, codec="none").pack(stats)
    packed = StatisticsStorage(precision=precision).pack(stats)  # the default codec: zstd
    for name in ("gram", "pooled_cov"):
        frame = packed[f"a/{name}:triu.zstd"]
        assert frame.dtype == torch.uint8 and frame.numel() < plain[f"a/{name}:triu"].nbytes
    back = StatisticsStorage(precision=precision).unpack(packed, {"a": 200, "b": 200})
    again = StatisticsStorage(precision=precision, codec="none").unpack(plain, {"a": 200, "b": 200})
    for name in ("gram", "pooled_cov"):  # bit for bit what the uncompressed form holds
        assert torch.equal(getattr(back["a"], name), getattr(again["a"], name))


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_file_holds_at_most_a_quarter_of_the_float64_matrix(codec, tmp_path, rng):
    n = 300
    x = torch.randn(400, n, generator=rng, dtype=torch.float64)
    cache = StatisticsCache(tmp_path, StatisticsStorage(codec=codec))  # float32 triangles
    cache.keep("k" * 32, {"a": InputStatistics(tokens=400, gram=x.T @ x)})
    size, triangle = cache.path("k" * 32).stat().st_size, n * (n + 1) // 2 * 4
    if codec == "none":  # the triangle's diagonal makes it (n + 1) / 4n of the float64 matrix
        assert triangle <= size <= triangle + 4096  # + header and metadata
    else:
        assert size < 0.25 * n * n * 8 < triangle


def test_stored_bytes_of_known_models():
    assert stored_bytes([576, 576, 576, 1536], 30, "float32") == 201_473_280  # SmolLM2-135M
    assert stored_bytes([4096, 4096, 4096, 11008], 32, "float32") == 10_977_984_512  # Llama-2-7B


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ConfigError, match="statistics.precision='float16'"):
        StatisticsStorage(precision="float16")
    with pytest.raises(ConfigError, match="statistics.codec='gzip'"):
        StatisticsStorage(codec="gzip")
