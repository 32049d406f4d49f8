"""Decompositions on disk (``decomposition_cache=true``): one safetensors file per matrix.

A decomposition depends on the weight, the statistics it was computed from and the
factorizer, so it is keyed by the visit's statistics key (model, calibration, mode, block and
what the block was fed), the factorizer's identity and the matrix name; files are written
atomically and checked by a content hash like the statistics. A sweep over ratios then
decomposes every matrix once, and a requeued or re-run job reads them back. Worth it where
decomposing is costly (large matrices, float64 on a CPU); a 7B model takes about 100 GB in
float64, so it is off by default.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from lrc.factorizers.base import Decomposition
from lrc.files import cache_key, load_checked, save_checked


class DecompositionCache:
    """``get_or_compute(statistics, factorizer, name, compute)``; counts what it reused."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "decompositions"
        self.reused = 0
        self.computed = 0

    def key(self, statistics: Mapping[str, Any], factorizer: Mapping[str, Any], name: str) -> str:
        return cache_key({"statistics": dict(statistics), "factorizer": dict(factorizer), "matrix": name,
                          "protocol": 2})

    def get_or_compute(self, statistics: Mapping[str, Any], factorizer: Mapping[str, Any], name: str,
                       compute: Callable[[], Decomposition]) -> Decomposition:
        key = self.key(statistics, factorizer, name)
        path = self.root / f"{key}.safetensors"
        found = load_checked(path, key)
        if found is not None and (dec := from_parts(*found)) is not None:
            self.reused += 1
            return dec
        dec = compute()
        save_checked(path, key, *to_parts(dec))
        self.computed += 1
        return dec

    def report(self) -> dict[str, int]:
        return {"decompositions_reused": self.reused, "decompositions_computed": self.computed}


def to_parts(dec: Decomposition) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every field of ``dec`` (a Decomposition or a subclass such as ResSVD's): tensors, and the
    rest as JSON in the metadata with the class name."""
    tensors, plain = {}, {}
    for f in fields(dec):
        value = getattr(dec, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().cpu()
        elif value is not None:
            plain[f.name] = value
    return tensors, {"class": type(dec).__name__, "fields": json.dumps(plain, default=float)}


def from_parts(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Decomposition | None:
    """The decomposition :func:`to_parts` wrote (None: a class this version does not know)."""
    cls = _decomposition_classes().get(meta.get("class", ""))
    return None if cls is None else cls(**tensors, **json.loads(meta.get("fields", "{}")))


def _decomposition_classes() -> dict[str, type[Decomposition]]:
    """Decomposition and every subclass defined so far (the factorizer that wrote one is loaded)."""
    found, todo = {}, [Decomposition]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found
