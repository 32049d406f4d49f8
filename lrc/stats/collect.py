"""Calibration statistics: hooks collect only what the chosen methods declare they need.

Kinds (names a factorizer or allocator puts in its ``needs``):

* ``gram`` - G = sum_t x_t x_tᵀ of each shared linear input (one G for q/k/v, one for
  gate/up). Each batch's Gram is computed in float32 GEMMs (the fast path on every
  device), only its upper triangle for wide inputs (:func:`lrc.stats.hooks.add_gram`), and summed across
  batches in float64.
* ``mean_abs`` - mean_t |x_t| per input channel (ASVD's activation scale).
* ``mean`` - mean_t x_t per input channel.
* ``pooled_cov:K`` - Bolaco's pooled covariance: the calibration token stream is cut into K
  contiguous groups of (nearly) equal size, the sample covariance is computed within each
  group and the K covariances are averaged. Accumulated as sum_g G_g / (n_g - 1) and the
  group sums, so it costs one Gram per group, not one matrix per group.
* ``fisher`` - FWSVD's row importances: sum over calibration batches of the squared
  gradient of the LM loss, summed over each weight row (a backward pass; every gradient
  is reduced to its row sums as soon as it is accumulated and then freed).

* ``cosine`` - MGAA's sublayer importance: for every attention and MLP sublayer, the mean
  over calibration tokens of cos(x, f(x)) and cos(x, x + f(x)), x the sublayer's input
  hidden state and f(x) its output (the adapter table names where each sublayer starts
  and ends). Stored under :func:`lrc.stats.hooks.sublayer_key`.

Input kinds and ``cosine`` are computed in one forward pass; hooks are always removed (``finally``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from lrc.errors import ConfigError
from lrc.model.adapters import TargetLinear, decoder_stack
from lrc.stats.hooks import StatisticsHooks, device_of, hooks_on
from lrc.stats.kinds import FISHER, parse_kind
from lrc.stats.types import InputStatistics


def batches(windows: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size]


def _progress(windows: torch.Tensor, batch_size: int, desc: str):
    total = -(-windows.shape[0] // batch_size)
    return tqdm(batches(windows, batch_size), total=total, desc=desc, leave=False, disable=None)


def decoder_forward(model: nn.Module, windows: torch.Tensor, batch_size: int, desc: str = "forward") -> float:
    """Run the decoder (no LM head) over ``windows``; return the seconds it took."""
    decoder = decoder_stack(model)
    device = device_of(model)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in _progress(windows, batch_size, desc):
            decoder(input_ids=batch.to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def collect_fisher(model: nn.Module, targets: Sequence[TargetLinear], windows: torch.Tensor,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """Row sums of squared LM-loss gradients for every target weight (FWSVD)."""
    device = next(model.parameters()).device
    weights = {t.name: model.get_submodule(t.name).weight for t in targets}
    rows = {name: torch.zeros(w.shape[0], dtype=torch.float64, device=device) for name, w in weights.items()}
    saved = {p: p.requires_grad for p in model.parameters()}
    handles = []

    def reduce_into(name: str):
        def hook(param: torch.Tensor) -> None:
            rows[name] += param.grad.double().pow(2).sum(1)
            param.grad = None  # keep no full-size gradient beyond this layer
        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(reduce_into(name)))
        for batch in _progress(windows, batch_size, "fisher"):
            batch = batch.to(device)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    return {name: r.cpu() for name, r in rows.items()}


def collect_statistics(model: nn.Module, targets: Sequence[TargetLinear], windows: torch.Tensor,
                       kinds: Iterable[str], batch_size: int = 4) -> dict[str, InputStatistics]:
    """Collect ``kinds`` over ``windows``: ``{group name: InputStatistics}`` for input kinds,
    plus ``{"fisher:<linear name>": InputStatistics(fisher=...)}`` when ``fisher`` is asked for.
    Use :func:`for_target` to get one linear's view."""
    kinds = frozenset(kinds)
    parsed = {parse_kind(k)[0] for k in kinds}
    stats: dict[str, InputStatistics] = {}
    if parsed - {FISHER}:
        hooks = StatisticsHooks(model, targets, kinds, windows.numel(), device_of(model))
        with hooks_on(model, hooks.pre, hooks.post):
            decoder_forward(model, windows, batch_size, desc="calibration")
        stats.update(hooks.finish())
    if FISHER in parsed:
        for name, rows in collect_fisher(model, targets, windows, batch_size).items():
            stats[fisher_key(name)] = InputStatistics(tokens=windows.numel(), fisher=rows)
    return stats


def fisher_key(name: str) -> str:
    return f"fisher:{name}"


def for_target(stats: dict[str, InputStatistics], target: TargetLinear) -> InputStatistics | None:
    """The statistics one linear reads: its shared input's, plus its own Fisher rows."""
    shared = stats.get(target.group)
    own = stats.get(fisher_key(target.name))
    if own is None:
        return shared
    if shared is None:
        return own
    return replace(shared, fisher=own.fisher)  # `derived` stays shared with the group
