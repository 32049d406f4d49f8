"""How calibration statistics are kept on disk: compact, and exactly what every run uses.

A Gram matrix (or pooled covariance) is symmetric, so only its upper triangle is stored, in
``precision`` (float32 by default: with the triangle, a quarter of the float64 matrix's
bytes plus its diagonal), and by default compressed losslessly (``codec=zstd``: Blosc2's
byte shuffle, which groups the slowly varying sign/exponent bytes, then Zstandard level 1;
measured on SmolLM2's Grams: 15% smaller at about 0.5 GB/s, decompression faster still).
Statistics are accumulated in float64 and handed to the factorizers in float64; the
run that computes them rounds them through the stored form first, so a run that computes
statistics and a run that reads them back compute exactly the same model. Vectors (means,
row importances, cosines) are small and stay float64.

What a run writes per calibration set (n: input width; Llama-style blocks have four shared
inputs, widths h, h, h and the MLP's i) is at most ``blocks x (3 h(h+1)/2 + i(i+1)/2) x bytes``
before compression. With float32: SmolLM2-135M 201 MB (171 MB compressed), Llama-2-7B
11.0 GB, Llama-2-70B 164 GB (float64 full matrices: 805 MB, 44 GB, 655 GB;
``benchmarks/compression_floor.py`` prints them). ``write=False``
computes statistics in memory and writes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import blosc2
import numpy as np
import torch

from lrc.errors import ConfigError
from lrc.stats.types import InputStatistics

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
SYMMETRIC = frozenset({"gram", "pooled_cov"})
TRIANGLE = ":triu"  # suffix of a stored upper triangle's tensor name
CODECS = {"zstd": ".zstd", "none": ""}  # codec -> suffix after TRIANGLE of a compressed triangle
MIRROR_BLOCK = 256


@dataclass(frozen=True)
class StatisticsStorage:
    """``precision`` of stored symmetric matrices; ``codec``: their lossless compression (zstd |
    none); ``write``: whether computed statistics are written to the cache for later runs
    (False: a one-off run, nothing written)."""

    precision: str = "float32"
    write: bool = True
    codec: str = "zstd"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"statistics.precision={self.precision!r} is not one of {sorted(PRECISIONS)}")
        if self.codec not in CODECS:
            raise ConfigError(f"statistics.codec={self.codec!r} is not one of {sorted(CODECS)}")

    @property
    def tag(self) -> str:
        """What identifies the stored values in cache keys (statistics rounded differently differ;
        the codec is lossless and either form is read back, so it is not part of the tag)."""
        return f"triu-{self.precision}"

    def pack(self, stats: dict[str, InputStatistics]) -> dict[str, torch.Tensor]:
        """The tensors to store: ``<entry>/<field>``, symmetric fields as ``<entry>/<field>:triu``."""
        tensors = {}
        for entry, s in stats.items():
            for name in InputStatistics.TENSOR_FIELDS:
                value = getattr(s, name)
                if value is None:
                    continue
                if name in SYMMETRIC:
                    triangle = to_triangle(value.cpu(), PRECISIONS[self.precision])
                    suffix = TRIANGLE + CODECS[self.codec]
                    tensors[f"{entry}/{name}{suffix}"] = compressed(triangle) if self.codec != "none" else triangle
                else:
                    tensors[f"{entry}/{name}"] = value.cpu()
        return tensors

    @staticmethod
    def unpack(tensors: dict[str, torch.Tensor], tokens: dict[str, int]) -> dict[str, InputStatistics]:
        """The statistics :meth:`pack` stored (float64, symmetric matrices whole again)."""
        stats = {entry: InputStatistics(tokens=t) for entry, t in tokens.items()}
        for name, tensor in tensors.items():
            entry, _, field_name = name.rpartition("/")
            if field_name.endswith(TRIANGLE + CODECS["zstd"]):
                field_name, tensor = field_name.removesuffix(CODECS["zstd"]), decompressed(tensor)
            if field_name.endswith(TRIANGLE):
                field_name, tensor = field_name.removesuffix(TRIANGLE), from_triangle(tensor)
            setattr(stats[entry], field_name, tensor)
        return stats


def to_triangle(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The upper triangle of ``matrix``, row by row, in ``dtype`` (row slices: no index tensors)."""
    n = matrix.shape[0]
    out = torch.empty(n * (n + 1) // 2, dtype=dtype)
    start = 0
    for i in range(n):
        out[start:start + n - i] = matrix[i, i:]
        start += n - i
    return out


def compressed(values: torch.Tensor) -> torch.Tensor:
    """``values`` (1-d) losslessly compressed: Blosc2 byte shuffle + Zstandard level 1, as bytes
    (a uint8 tensor holding a Blosc2 frame, which records dtype and length; no 2 GB limit)."""
    cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 1, "filters": [blosc2.Filter.SHUFFLE],
               "typesize": values.element_size()}
    frame = blosc2.pack_array2(values.numpy(), cparams=cparams)
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8)


def decompressed(frame: torch.Tensor) -> torch.Tensor:
    """The values :func:`compressed` packed into ``frame``."""
    return torch.from_numpy(np.ascontiguousarray(blosc2.unpack_array2(frame.numpy().tobytes())))


def from_triangle(triangle: torch.Tensor) -> torch.Tensor:
    """The float64 symmetric n x n matrix whose upper triangle (row by row) is ``triangle``."""
    n = (math.isqrt(8 * triangle.numel() + 1) - 1) // 2
    if n * (n + 1) // 2 != triangle.numel():
        raise ValueError(f"{triangle.numel()} values are not the upper triangle of a square matrix")
    full = torch.empty(n, n, dtype=torch.float64)
    start = 0
    for i in range(n):
        full[i, i:] = triangle[start:start + n - i]
        start += n - i
    for i in range(0, n, MIRROR_BLOCK):  # the lower triangle, one cache-sized block column at a time
        j = i + MIRROR_BLOCK
        full[j:, i:j] = full[i:j, j:].T
        block = full[i:j, i:j]
        block.copy_(torch.triu(block) + torch.triu(block, 1).T)
    return full


def stored_bytes(widths: list[int], blocks: int, precision: str = "float32") -> int:
    """Bytes of the Gram statistics of ``blocks`` blocks whose shared inputs have ``widths``."""
    size = PRECISIONS[precision].itemsize
    return blocks * sum(n * (n + 1) // 2 for n in widths) * size
