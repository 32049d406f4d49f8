"""The statistic types every stage shares (plain data: tensors and token counts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class InputStatistics:
    """Calibration statistics of one input shared by one or more linears (q/k/v, gate/up).

    All float64 and optional (only what the methods asked for is collected):
    ``gram`` G = sum_t x_t x_tᵀ (n x n); ``mean_abs`` mean_t |x_t| (n); ``mean`` mean_t x_t (n);
    ``pooled_cov`` the pooled covariance of the input (n x n; Bolaco); ``fisher`` the row
    importances of one linear's weight (m; FWSVD), which is per linear, not shared;
    ``cosine`` the mean cosine similarity of one sublayer's input and output hidden states,
    [before the residual add, after it] (2; MGAA), which is per sublayer.
    ``derived`` holds quantities computed from them once and shared by the linears that
    read this input (for example a whitening factor); it is never saved.
    """

    tokens: int
    gram: torch.Tensor | None = None
    mean_abs: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    pooled_cov: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    cosine: torch.Tensor | None = None
    derived: dict[str, Any] = field(default_factory=dict, repr=False)

    TENSOR_FIELDS = ("gram", "mean_abs", "mean", "pooled_cov", "fisher", "cosine")
