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
from pathlib import Path
from typing import Any

from lrc.factorizers.base import Decomposition
from lrc.files import cache_key, load_checked, save_checked

TENSORS = ("left", "right", "spectrum", "offset")


class DecompositionCache:
    """``get_or_compute(statistics, factorizer, name, compute)``; counts what it reused."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "decompositions"
        self.reused = 0
        self.computed = 0

    def key(self, statistics: Mapping[str, Any], factorizer: Mapping[str, Any], name: str) -> str:
        return cache_key({"statistics": dict(statistics), "factorizer": dict(factorizer), "matrix": name,
                          "protocol": 1})

    def get_or_compute(self, statistics: Mapping[str, Any], factorizer: Mapping[str, Any], name: str,
                       compute: Callable[[], Decomposition]) -> Decomposition:
        key = self.key(statistics, factorizer, name)
        path = self.root / f"{key}.safetensors"
        found = load_checked(path, key)
        if found is not None:
            tensors, meta = found
            self.reused += 1
            return Decomposition(diagnostics=json.loads(meta.get("diagnostics", "{}")),
                                 **{k: tensors[k] for k in TENSORS if k in tensors})
        dec = compute()
        tensors = {k: getattr(dec, k).detach().cpu() for k in TENSORS if getattr(dec, k) is not None}
        save_checked(path, key, tensors, {"diagnostics": json.dumps(dec.diagnostics, default=float)})
        self.computed += 1
        return dec

    def report(self) -> dict[str, int]:
        return {"decompositions_reused": self.reused, "decompositions_computed": self.computed}
