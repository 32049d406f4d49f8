"""xᵀx with only its upper triangle computed, in row strips: about half the FLOPs of one GEMM
on a CPU. Used for the statistics' input Grams and for the factorizers' Gram sides."""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Width of the row strips. Measured on this project's 2-core CPU (benchmarks/compression_floor.py;
# 2048 tokens): 256-wide strips make x^T x 2.2x faster at n=576, 1.6x at 1536, 1.8x at 4096.
# GPUs run one large GEMM near peak, so there strips only start beyond 4096 columns.
GRAM_STRIP = {"cpu": 256, "cuda": 4096}


def gram_strips(x: torch.Tensor) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(rows, columns, block) covering the upper triangle of xᵀx (x: tokens x n), in x's dtype;
    one block (the whole product) where strips would not pay."""
    n = x.shape[-1]
    strip = GRAM_STRIP.get(x.device.type)
    if strip is None or n <= 2 * strip:
        yield slice(0, n), slice(0, n), x.mT @ x
        return
    for i in range(0, n, strip):
        yield slice(i, i + strip), slice(i, n), x[..., i:i + strip].mT @ x[..., i:]


def upper_gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx in x's dtype whose upper triangle is exact (the lower one is not computed: read it
    with ``UPLO="U"`` or complete it with :func:`symmetric`)."""
    n = x.shape[-1]
    out = x.new_zeros(*x.shape[:-2], n, n)
    for rows, cols, block in gram_strips(x):
        out[..., rows, cols] = block
    return out


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += xᵀx`` in float64 from products in x's dtype, upper triangle only (wider inputs);
    the lower triangle is then stale: :func:`symmetric` completes it."""
    for rows, cols, block in gram_strips(x):
        acc[rows, cols] += block.double()


def symmetric(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from an accumulator whose upper triangle is exact."""
    return torch.triu(acc) + torch.triu(acc, 1).mT
