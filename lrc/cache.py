"""On-disk caches shared by every run of a sweep: content-keyed, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrc.factorizers.base import InputStatistics

log = logging.getLogger(__name__)


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of plain data (sorted JSON)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


class StatisticsCache:
    """Statistics of one (model, calibration, targets, kinds, mode) in one safetensors file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "stats"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, InputStatistics] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
            if meta.get("key") != key:
                raise ValueError(f"key mismatch ({meta.get('key')})")
            tokens = json.loads(meta["tokens"])
        except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable statistics cache %s: %s", path, exc)
            return None
        return {g: InputStatistics(tokens=t, gram=tensors.get(f"{g}/gram")) for g, t in tokens.items()}

    def save(self, key: str, stats: dict[str, InputStatistics]) -> Path:
        tensors = {f"{g}/gram": s.gram.contiguous() for g, s in stats.items() if s.gram is not None}
        meta = {"key": key, "tokens": json.dumps({g: s.tokens for g, s in stats.items()})}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, InputStatistics]]
                       ) -> tuple[dict[str, InputStatistics], bool]:
        """Cached statistics, or ``compute()`` and cache them; returns (stats, was_cached)."""
        cached = self.load(key)
        if cached is not None:
            log.info("statistics: reusing cache %s", self.path(key))
            return cached, True
        stats = compute()
        self.save(key, stats)
        log.info("statistics: computed and cached at %s", self.path(key))
        return stats, False


class JsonCache:
    """Small JSON records (e.g. dense-model metrics) keyed by content."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = Path(root) / kind

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.root / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def save(self, key: str, value: dict[str, Any]) -> None:
        atomic_write_json(self.root / f"{key}.json", value)


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
