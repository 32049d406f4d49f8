"""A calibration source that mixes several texts with weights (issue 18).

Whitening and rank search fit the calibration text; a model calibrated on one genre is used on
every other. :class:`Mixture` draws the calibration windows from several sources:

* component c gets n_c of the ``nsamples`` windows, n_c by the largest remainder of
  nsamples w_c / sum w (so the counts sum to nsamples and follow the weights as closely as
  whole windows can);
* each component's windows are drawn from it alone, as a single source would draw them
  (``stream`` or ``documents`` sampling), with its own seed (a hash of the run seed and the
  component's name), so adding a component changes the others' windows only through their
  counts, and no two components or seeds share a seed by construction;
* the windows are interleaved evenly: window j of component c sits at (j + 1/2) / n_c of the
  way through the set, so every batch of a streamed pass sees the mixture.

A mixture is also a validation source (``calibration.validation``: search allocators then
score plans on the mixture's held-out text). It has no single text of its own, so a mixture
calibration needs an explicit validation source.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lrc.errors import ConfigError


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Whole counts summing to ``total`` in proportion to ``weights`` (Hamilton's method; ties to
    the earlier component)."""
    whole = sum(weights)
    quotas = [total * w / whole for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def component_seed(seed: int, name: str) -> int:
    """The seed component ``name`` draws its windows with under run seed ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def interleaved(counts: list[int]) -> list[int]:
    """The component of each slot: window j of component c at position (j + 1/2) / n_c."""
    slots = [((j + 0.5) / n, c, j) for c, n in enumerate(counts) for j in range(n)]
    return [c for _, c, _ in sorted(slots)]


@dataclass(frozen=True)
class Mixture:
    """Text sources mixed by weight: ``components`` {name: source}, ``weights`` {name: weight > 0}
    (None: equal weights)."""

    components: Mapping[str, Any]
    weights: Mapping[str, float] | None = None
    _names: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.components, Mapping) or not self.components:
            raise ConfigError(f"mixture: components={self.components!r} must name at least one text source")
        names = tuple(self.components)
        weights = dict(self.weights) if self.weights is not None else dict.fromkeys(names, 1.0)
        if set(weights) != set(names):
            raise ConfigError(f"mixture: weights name {sorted(weights)} but the components are {sorted(names)}")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)):
                raise ConfigError(f"mixture: weight {name}={w!r} must be a positive number")
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "weights", {n: float(weights[n]) for n in names})

    def counts(self, nsamples: int) -> dict[str, int]:
        """How many of ``nsamples`` windows each component gives."""
        return dict(zip(self._names, largest_remainder(nsamples, [self.weights[n] for n in self._names]), strict=True))

    def windows(self, draw: Any, nsamples: int, seed: int) -> torch.Tensor:
        """The mixture's ``nsamples`` windows; ``draw(source, n, seed)`` draws n windows from one source."""
        counts = self.counts(nsamples)
        empty = [name for name, n in counts.items() if n == 0]
        if empty:
            raise ConfigError(f"mixture: nsamples={nsamples} gives components {empty} no window at weights "
                              f"{dict(self.weights)}; raise nsamples or their weights")
        drawn = {name: draw(self.components[name], counts[name], component_seed(seed, name)) for name in self._names}
        taken = dict.fromkeys(drawn, 0)
        rows = []
        for c in interleaved([counts[n] for n in self._names]):
            name = self._names[c]
            rows.append(drawn[name][taken[name]])
            taken[name] += 1
        return torch.stack(rows)

    def documents(self) -> list[str]:
        return [doc for name in self._names for doc in self.components[name].documents()]

    def text(self) -> str:
        raise ConfigError("a mixture has no single text: set calibration.validation to a text source "
                          "(or a mixture of held-out texts)")

    def describe(self) -> dict[str, Any]:
        return {"source": "mixture", "order": list(self._names),  # the interleaving follows this order
                "components": {n: self.components[n].describe() for n in self._names},
                "weights": dict(self.weights)}
