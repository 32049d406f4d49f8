"""Sequential error correction: each low-rank pair re-fitted towards the dense model's outputs.

For a target linear y = W x + b0 of block i, let x_d be its input in the dense model and x_c
its input in the model whose blocks before i are already compressed (and corrected). Once the
block is factorized to y' = B A x + b, the second factor (and the bias, when the layer has one)
is re-fitted in closed form with A fixed:

    [B b] = argmin_{B, b} sum_t || B A x_c,t + b - (W x_d,t + b0) ||²  =  M (Z Zᵀ)⁻¹,
    Z = [A X_c; 1ᵀ],   M = (W X_d + b0 1ᵀ) Zᵀ,

least squares on the second factor, as SVD-LLM's sequential update fits it by gradient steps
(arXiv 2403.07378, Sec. 3.3). Only sums over the calibration tokens are needed, per shared
input: C = sum x_d x_cᵀ, G = sum x_c x_cᵀ, s_c = sum x_c, s_d = sum x_d and the token count.
The current (B, b) is one candidate of the least squares, so the error of every linear on
its calibration tokens never grows. Layers without a bias keep none (the parameter count is
unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lrc.compress.stream import BlockStream, block_output
from lrc.model.adapters import TargetLinear
from lrc.model.layers import LowRankLinear
from lrc.stats.hooks import hooks_on

# Relative floor on the eigenvalues of Z Zᵀ (its scale: its mean diagonal): directions the
# calibration tokens never excite keep their current factor instead of a huge one.
RIDGE = 1e-10


@dataclass
class PairedMoments:
    """Sums over the calibration tokens of one input seen in both models (float64)."""

    cross: torch.Tensor  # sum x_d x_cᵀ (n x n)
    gram: torch.Tensor  # sum x_c x_cᵀ (n x n)
    dense_gram: torch.Tensor  # sum x_d x_dᵀ (n x n): only to report the error before and after
    sum_c: torch.Tensor  # sum x_c (n)
    sum_d: torch.Tensor  # sum x_d (n)
    tokens: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> PairedMoments:
        f64 = {"dtype": torch.float64, "device": device}
        return cls(*(torch.zeros(n, n, **f64) for _ in range(3)), torch.zeros(n, **f64), torch.zeros(n, **f64))

    def add(self, dense: torch.Tensor, compressed: torch.Tensor) -> None:
        """Add the tokens of one batch: ``dense`` and ``compressed`` inputs (tokens x n), paired by row."""
        xd, xc = dense.double(), compressed.double()
        self.cross += xd.T @ xc
        self.gram += xc.T @ xc
        self.dense_gram += xd.T @ xd
        self.sum_c += xc.sum(0)
        self.sum_d += xd.sum(0)
        self.tokens += xc.shape[0]


def corrected_second_factor(weight: torch.Tensor, bias: torch.Tensor | None, first: torch.Tensor,
                            moments: PairedMoments, fit_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """B (and b when ``fit_bias``) minimising the output error against the dense layer (see the
    module docstring); ``weight``/``bias``: the dense layer's W and b0, ``first``: A."""
    W, A = weight.double(), first.double()
    b0 = bias.double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    a_sum = A @ moments.sum_c
    M = W @ moments.cross @ A.T + torch.outer(b0, a_sum)  # sum (W x_d + b0)(A x_c)ᵀ
    ZZ = A @ moments.gram @ A.T
    if fit_bias:
        r = A.shape[0]
        count = torch.tensor([float(moments.tokens)], dtype=ZZ.dtype, device=ZZ.device)
        ZZ = torch.cat([torch.cat([ZZ, a_sum[:, None]], 1), torch.cat([a_sum, count])[None]])
        M = torch.cat([M, (W @ moments.sum_d + moments.tokens * b0)[:, None]], 1)
    evals, Q = torch.linalg.eigh((ZZ + ZZ.T) / 2)
    floor = RIDGE * max(float(torch.diagonal(ZZ).mean()), 0.0)
    keep = evals > floor
    solved = ((M @ Q[:, keep]) / evals[keep]) @ Q[:, keep].T  # M (Z Zᵀ)⁺ on the excited directions
    if fit_bias:
        return solved[:, :r], solved[:, r]
    return solved, None


def output_error(weight: torch.Tensor, bias: torch.Tensor | None, layer: LowRankLinear,
                 moments: PairedMoments) -> float:
    """sum_t ||B A x_c + b - (W x_d + b0)||² of ``layer`` against the dense (W, b0), from the sums."""
    W = weight.detach().double()
    P = layer.second.weight.detach().double() @ layer.first.weight.detach().double()
    zero = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    b = layer.second.bias.detach().double() if layer.second.bias is not None else zero
    b0 = bias.double() if bias is not None else zero
    d = b - b0  # the residual per token is P x_c - W x_d + d
    return float(torch.trace(P @ moments.gram @ P.T) - 2 * torch.trace(W @ moments.cross @ P.T)
                 + torch.trace(W @ moments.dense_gram @ W.T) + 2 * d @ (P @ moments.sum_c - W @ moments.sum_d)
                 + moments.tokens * d @ d)


def correct_block(model: nn.Module, targets: Iterable[TargetLinear], dense: Mapping[str, DenseLinear],
                  moments: Mapping[str, PairedMoments]) -> dict[str, tuple[float, float]]:
    """Re-fit the second factor of every target of one block that is now a LowRankLinear;
    ``dense``: the block's dense (W, b0) before the swap. Returns each corrected linear's output
    error on the calibration tokens (before, after)."""
    errors = {}
    for t in targets:
        layer = model.get_submodule(t.name)
        if not isinstance(layer, LowRankLinear) or t.group not in moments or t.name not in dense:
            continue
        (W, b0), paired = dense[t.name], moments[t.group]
        before = output_error(W, b0, layer, paired)
        fit_bias = layer.second.bias is not None
        B, b = corrected_second_factor(W, b0, layer.first.weight.detach(), paired, fit_bias)
        with torch.no_grad():
            layer.second.weight.copy_(B.to(layer.second.weight.dtype))
            if fit_bias:
                layer.second.bias.copy_(b.to(layer.second.bias.dtype))
        errors[t.name] = (before, output_error(W, b0, layer, paired))
    return errors


DenseLinear = tuple[torch.Tensor, "torch.Tensor | None"]  # (W, b0) of a target before its swap


def dense_copies(model: nn.Module, targets: Iterable[TargetLinear]) -> dict[str, DenseLinear]:
    """(W, b0) of every target, copied before the block is factorized (one block's worth)."""
    copies = {}
    for t in targets:
        layer = model.get_submodule(t.name)
        if isinstance(layer, nn.Linear):
            copies[t.name] = (layer.weight.detach().clone(),
                              layer.bias.detach().clone() if layer.bias is not None else None)
    return copies


def paired_pass(model: nn.Module, index: int, dense: BlockStream, compressed: BlockStream,
                targets: Iterable[TargetLinear]) -> dict[str, PairedMoments]:
    """Run dense block ``index`` over both streams, batch by batch, summing each shared input's
    paired moments; the dense stream advances past the block, the compressed one does not."""
    if not dense.position == compressed.position == index:
        raise RuntimeError(f"paired pass at block {index}: streams at {dense.position} and {compressed.position}")
    groups = {t.group for t in targets}
    captured: dict[str, torch.Tensor] = {}
    moments: dict[str, PairedMoments] = {}

    def capture(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            captured[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    def accumulate(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if name not in moments:
                moments[name] = PairedMoments.zeros(x.shape[-1], x.device)
            moments[name].add(captured.pop(name), x)
        return hook

    block = dense.blocks[index]
    outputs = []
    with torch.inference_mode():
        for h_d, kw_d, h_c, kw_c in zip(dense.hidden, dense.kwargs[index], compressed.hidden,
                                        compressed.kwargs[index], strict=True):
            with hooks_on(model, {g: capture(g) for g in groups}):
                outputs.append(block_output(block(h_d, **kw_d)))
            with hooks_on(model, {g: accumulate(g) for g in groups}):
                block(h_c, **kw_c)
    dense.hidden, dense.position = outputs, index + 1
    return moments
