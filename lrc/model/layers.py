"""LowRankLinear and the module swap.

``LowRankLinear`` computes y = B (A x) + b with A: r x n and B: m x r, two plain
``nn.Linear`` layers, so it runs, saves and loads like any transformers module.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = B A x + b: a rank-``rank`` replacement for an ``nn.Linear(in_features, out_features)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)  # A
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)  # B

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> LowRankLinear:
        """Build from B (m x r), A (r x n) and an optional bias (m)."""
        (m, r), (r2, n) = B.shape, A.shape
        if r != r2:
            raise ValueError(f"factor shapes {tuple(B.shape)} and {tuple(A.shape)} do not chain")
        dtype = dtype or A.dtype
        layer = cls(n, m, r, bias=bias is not None, dtype=dtype, device=A.device)
        with torch.no_grad():
            layer.first.weight.copy_(A)
            layer.second.weight.copy_(B)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        """The m x n matrix B A this layer applies."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.second.bias is not None}")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` inside ``root``; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
