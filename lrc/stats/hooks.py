"""Forward hooks that accumulate statistics of linear inputs and of sublayers, in float64."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lrc.errors import ConfigError
from lrc.gram import add_gram, symmetric
from lrc.model.adapters import TargetLinear, architecture_for, decoder_blocks
from lrc.stats.kinds import COSINE, FISHER, POOLED, parse_kind
from lrc.stats.types import InputStatistics


class InputAccumulator:
    """Forward pre-hook accumulating the requested statistics of one linear input."""

    def __init__(self, n: int, device: torch.device, kinds: frozenset[str], total_tokens: int) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.tokens = 0
        self.gram = torch.zeros(n, n, **f64) if "gram" in kinds else None
        self.abs_sum = torch.zeros(n, **f64) if "mean_abs" in kinds else None
        self.sum = torch.zeros(n, **f64) if "mean" in kinds else None
        pooled = [parse_kind(k)[1] for k in kinds if parse_kind(k)[0] == POOLED]
        self.groups = pooled[0] if pooled else None
        if self.groups:
            if self.groups > total_tokens:
                raise ConfigError(
                    f"pooled covariance: {self.groups} groups but only {total_tokens} calibration tokens")
            self.bounds = [g * total_tokens // self.groups for g in range(self.groups + 1)]
            self.weighted = torch.zeros(n, n, **f64)
            self.group_sums = torch.zeros(self.groups, n, **f64)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        start, self.tokens = self.tokens, self.tokens + x.shape[0]
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        if self.sum is not None:
            self.sum += x.sum(0, dtype=torch.float64)
        if not self.groups:
            if self.gram is not None:
                add_gram(self.gram, x)
            return
        for g in range(self.groups):  # the groups this batch's tokens fall in
            lo, hi = max(self.bounds[g], start), min(self.bounds[g + 1], self.tokens)
            if lo >= hi:
                continue
            xg = x[lo - start:hi - start]
            gram_g = torch.zeros_like(self.weighted)
            add_gram(gram_g, xg)
            if self.gram is not None:
                self.gram += gram_g
            self.weighted += gram_g / max(self.bounds[g + 1] - self.bounds[g] - 1, 1)
            self.group_sums[g] += xg.sum(0, dtype=torch.float64)

    def finish(self) -> InputStatistics:
        out = InputStatistics(tokens=self.tokens)
        if self.gram is not None:
            out.gram = symmetric(self.gram).cpu()
        if self.abs_sum is not None:
            out.mean_abs = (self.abs_sum / max(self.tokens, 1)).cpu()
        if self.sum is not None:
            out.mean = (self.sum / max(self.tokens, 1)).cpu()
        if self.groups:
            sizes = torch.tensor(self.bounds, dtype=torch.float64, device=self.weighted.device).diff()
            means = self.group_sums / sizes.clamp(min=1)[:, None]
            correction = (means.T * (sizes / (sizes - 1).clamp(min=1))) @ means
            out.pooled_cov = ((symmetric(self.weighted) - correction) / self.groups).cpu()
        return out


class SublayerCosine:
    """Mean cos(x, f(x)) and cos(x, x + f(x)) over tokens for one sublayer.

    ``enter`` is a forward pre-hook on the module whose input is x; ``exit`` a forward hook
    on the module whose output is f(x) (the first element when it returns a tuple).
    """

    def __init__(self, device: torch.device) -> None:
        self.tokens = 0
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.x: torch.Tensor | None = None

    def enter(self, module: nn.Module, args: tuple) -> None:
        self.x = args[0].detach()

    def exit(self, module: nn.Module, args: tuple, output) -> None:
        y = (output[0] if isinstance(output, tuple) else output).detach().float()
        if self.x is None or self.x.shape != y.shape:
            raise ConfigError(f"sublayer cosine: output of {type(module).__name__} does not match the input "
                              "hidden state (check the adapter table's sublayer start/end)")
        x = self.x.float().reshape(-1, y.shape[-1])
        y = y.reshape(-1, y.shape[-1])
        self.sums[0] += F.cosine_similarity(x, y, dim=-1).sum(dtype=torch.float64)
        self.sums[1] += F.cosine_similarity(x, x + y, dim=-1).sum(dtype=torch.float64)
        self.tokens += x.shape[0]
        self.x = None

    def finish(self) -> InputStatistics:
        return InputStatistics(tokens=self.tokens, cosine=(self.sums / max(self.tokens, 1)).cpu())


def sublayer_key(block: int, sublayer: str) -> str:
    return f"sublayer:{block}:{sublayer}"


def sublayer_cosine(stats: dict[str, InputStatistics]) -> dict[tuple[int, str], tuple[float, float]]:
    """``{(block, sublayer): (cos before the residual add, after)}`` from collected statistics."""
    out = {}
    for key, s in stats.items():
        if key.startswith("sublayer:") and s.cosine is not None:
            _, block, sub = key.split(":")
            out[(int(block), sub)] = (float(s.cosine[0]), float(s.cosine[1]))
    return out


def _cosine_hooks(model: nn.Module, blocks: Iterable[int] | None = None
                  ) -> tuple[dict[str, SublayerCosine], dict[str, object], dict[str, object]]:
    arch = architecture_for(model)
    path, layers = decoder_blocks(model, arch)
    device = device_of(model)
    accs, pre, post = {}, {}, {}
    for i in range(len(layers)) if blocks is None else blocks:
        for sub in arch.sublayers:
            acc = accs[sublayer_key(i, sub.name)] = SublayerCosine(device)
            pre[f"{path}.{i}.{sub.start}"] = acc.enter
            post[f"{path}.{i}.{sub.end}"] = acc.exit
    return accs, pre, post


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class StatisticsHooks:
    """The accumulators and hooks for the forward-pass kinds (input kinds, ``cosine``) of
    ``targets``; ``blocks`` limits the cosine hooks to those decoder blocks (layer-wise mode).

    Use :func:`hooks_on` with ``pre`` and ``post`` around forward passes, then ``finish()``.
    """

    def __init__(self, model: nn.Module, targets: Sequence[TargetLinear], kinds: frozenset[str],
                 total_tokens: int, device: torch.device, blocks: Iterable[int] | None = None) -> None:
        input_kinds = frozenset(k for k in kinds if parse_kind(k)[0] not in (FISHER, COSINE))
        groups = {t.group: t.shape[1] for t in targets}
        self.inputs = ({g: InputAccumulator(n, device, input_kinds, total_tokens) for g, n in groups.items()}
                       if input_kinds else {})
        cosines, enter, self.post = (_cosine_hooks(model, blocks) if COSINE in kinds
                                     else ({}, {}, {}))
        self.cosines = cosines
        self.pre: dict[str, object] = dict(self.inputs)
        for name, hook in enter.items():  # a sublayer start may also be a target's input module
            self.pre[name] = _chain(self.pre[name], hook) if name in self.pre else hook

    def finish(self) -> dict[str, InputStatistics]:
        return {**{g: acc.finish() for g, acc in self.inputs.items()},
                **{key: acc.finish() for key, acc in self.cosines.items()}}


@contextmanager
def hooks_on(model: nn.Module, hooks: dict[str, object], after: dict[str, object] | None = None):
    """Register forward pre-hooks ``{module name: hook}`` (and forward hooks ``after``);
    remove them whatever happens."""
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        for name, hook in (after or {}).items():
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _chain(first, second):
    def hook(module: nn.Module, args: tuple) -> None:
        first(module, args)
        second(module, args)
    return hook
