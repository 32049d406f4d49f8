"""Sequential error correction: each low-rank pair re-fitted in closed form on the inputs it
meets in the compressed model.

For a target linear y = W x + b0 of block i, let x_c be its input in the model whose blocks
before i are already compressed (and corrected), and x_d its input in the dense model. Once
the block is factorized to y' = B A x + b, the second factor (and the bias, when the layer has
one) is re-fitted with A fixed, towards one of two targets t(x) (``update_target``):

* ``local`` (SVD-LLM's released code): the dense layer applied to the same compressed input,
  t = W x_c + b0. The pair re-learns its own truncation on the inputs it will see; this is
  ``whitening_local_update`` / ``local_update.add_batch_update_u`` in SVDLLM.py of
  AIoT-MLSys-Lab/SVD-LLM (a least squares per layer, A from the dense model's whitening);
* ``dense``: the dense model's output, t = W x_d + b0, so each pair also absorbs the drift the
  compressed blocks before it left in its input.

    [B b] = argmin_{B, b} sum_t || B A x_c,t + b - t(x_t) ||²  =  M (Z Zᵀ)⁻¹,
    Z = [A X_c; 1ᵀ],   M = T Zᵀ,

with T the targets. Only sums over the calibration tokens are needed, per shared input:
C = sum x_t x_cᵀ, G = sum x_c x_cᵀ, s_c = sum x_c, s_t = sum x_t and the token count, where x_t
is x_d (``dense``) or x_c itself (``local``). The current (B, b) is one candidate of the least
squares, so the error of every linear on its calibration tokens never grows. Layers without a
bias keep none (the parameter count is unchanged).
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

    cross: torch.Tensor  # sum x_t x_cᵀ (n x n)
    gram: torch.Tensor  # sum x_c x_cᵀ (n x n)
    dense_gram: torch.Tensor  # sum x_t x_tᵀ (n x n): only to report the error before and after
    sum_c: torch.Tensor  # sum x_c (n)
    sum_d: torch.Tensor  # sum x_t (n)
    tokens: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> PairedMoments:
        f64 = {"dtype": torch.float64, "device": device}
        return cls(*(torch.zeros(n, n, **f64) for _ in range(3)), torch.zeros(n, **f64), torch.zeros(n, **f64))

    def add(self, dense: torch.Tensor, compressed: torch.Tensor) -> None:
        """Add the tokens of one batch: the inputs the targets are taken on (``dense``: x_t) and the
        ``compressed`` inputs (tokens x n), paired by row."""
        xc = compressed.double()
        gram, total = xc.T @ xc, xc.sum(0)
        if dense is compressed:  # the local target: every sum is the same one, computed once
            cross = dense_gram = gram
            total_d = total
        else:
            xd = dense.double()
            cross, dense_gram, total_d = xd.T @ xc, xd.T @ xd, xd.sum(0)
        self.cross += cross
        self.gram += gram
        self.dense_gram += dense_gram
        self.sum_c += total
        self.sum_d += total_d
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


def paired_pass(model: nn.Module, index: int, compressed: BlockStream, targets: Iterable[TargetLinear],
                dense: BlockStream | None = None) -> dict[str, PairedMoments]:
    """Run dense block ``index`` over the ``compressed`` stream, batch by batch, summing each shared
    input's paired moments. With a ``dense`` stream the targets are the dense model's (x_t = x_d;
    that stream advances past the block); without, they are the dense layer's on the compressed
    input (x_t = x_c, SVD-LLM's local update). The compressed stream does not advance."""
    if dense is not None and dense.position != index or compressed.position != index:
        raise RuntimeError(f"paired pass at block {index}: streams at "
                           f"{dense.position if dense is not None else '-'} and {compressed.position}")
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
            moments[name].add(captured.pop(name) if dense is not None else x, x)
        return hook

    block = compressed.blocks[index]
    outputs = []
    with torch.inference_mode():
        for batch, (h_c, kw_c) in enumerate(zip(compressed.hidden, compressed.kwargs[index], strict=True)):
            if dense is not None:
                with hooks_on(model, {g: capture(g) for g in groups}):
                    outputs.append(block_output(block(dense.hidden[batch], **dense.kwargs[index][batch])))
            with hooks_on(model, {g: accumulate(g) for g in groups}):
                block(h_c, **kw_c)
    if dense is not None:
        dense.hidden, dense.position = outputs, index + 1
    return moments
