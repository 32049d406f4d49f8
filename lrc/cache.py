"""On-disk caches shared by every run of a sweep: content-keyed, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lrc.factorizers.base import InputStatistics

log = logging.getLogger(__name__)


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of plain data (sorted JSON)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` in one step.

    Readers see the old file or the whole new one, never a part; a failure leaves no litter.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


class StatisticsCache:
    """Calibration statistics, one safetensors file per statistics kind.

    A run that needs kinds A and B reuses A computed by an earlier run and computes only B.
    Tensors are named ``<entry>/<field>``; the metadata holds the key and token counts, and a
    file whose key or contents do not check out is ignored (and recomputed), never half-read.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "stats"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """An exclusive file lock across processes and nodes sharing this cache folder."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / f"{key}.lock"))
        try:
            lock.acquire(blocking=False)
        except Timeout:
            log.info("statistics: another job is computing them; waiting for %s", lock.lock_file)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def load(self, key: str) -> dict[str, InputStatistics] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
            if meta.get("key") != key:
                raise ValueError(f"key mismatch ({meta.get('key')})")
            if meta.get("sha256") != _digest(tensors):
                raise ValueError("content hash mismatch")
            tokens = json.loads(meta["tokens"])
        except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable statistics cache %s: %s", path, exc)
            return None
        stats = {entry: InputStatistics(tokens=t) for entry, t in tokens.items()}
        for name, tensor in tensors.items():
            entry, _, field_name = name.rpartition("/")
            setattr(stats[entry], field_name, tensor)
        return stats

    def save(self, key: str, stats: dict[str, InputStatistics]) -> Path:
        tensors = {f"{entry}/{f}": getattr(s, f).contiguous() for entry, s in stats.items()
                   for f in InputStatistics.TENSOR_FIELDS if getattr(s, f) is not None}
        meta = {"key": key, "tokens": json.dumps({entry: s.tokens for entry, s in stats.items()}),
                "sha256": _digest(tensors)}
        path = self.path(key)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    def has(self, base: dict[str, Any], kinds: frozenset[str]) -> bool:
        """Whether a file exists for every kind (its contents are checked when loaded)."""
        return all(self.path(cache_key({**base, "kind": kind})).is_file() for kind in kinds)

    def get_or_compute(self, base: dict[str, Any], kinds: frozenset[str],
                       compute: Callable[[frozenset[str]], dict[str, InputStatistics]],
                       quiet: bool = False) -> tuple[dict[str, InputStatistics], frozenset[str]]:
        """Statistics of every kind, loading cached kinds and computing the rest in one pass.

        Returns (statistics, the kinds that came from the cache). ``quiet`` logs at debug
        level (layer-wise mode calls this once per block).
        """
        info = log.debug if quiet else log.info
        keys = {kind: cache_key({**base, "kind": kind}) for kind in sorted(kinds)}
        parts = {kind: self.load(key) for kind, key in keys.items()}
        missing = frozenset(kind for kind, part in parts.items() if part is None)
        if missing:
            # One job computes, concurrent jobs (a SLURM sweep) wait on the lock and then load it.
            with self.lock(cache_key(base)):
                parts.update({kind: self.load(keys[kind]) for kind in missing})
                missing = frozenset(kind for kind, part in parts.items() if part is None)
                if missing:
                    fresh = compute(missing)
                    for kind in missing:
                        parts[kind] = _only(fresh, kind_field(kind))
                        self.save(keys[kind], parts[kind])
                        info("statistics: computed %s, cached at %s", kind, self.path(keys[kind]))
        cached = frozenset(kinds) - missing
        if cached:
            info("statistics: reused cached %s", ", ".join(sorted(cached)))
        return _merge(parts.values()), cached


def _digest(tensors: dict[str, Any]) -> str:
    """sha256 over every tensor's name and bytes (sorted): a file that does not match is not used."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy())  # no copy
    return h.hexdigest()


def kind_field(kind: str) -> str:
    """The InputStatistics field a statistics kind fills (``pooled_cov:32`` -> ``pooled_cov``)."""
    return kind.partition(":")[0]


def _only(stats: dict[str, InputStatistics], field_name: str) -> dict[str, InputStatistics]:
    return {entry: InputStatistics(tokens=s.tokens, **{field_name: getattr(s, field_name)})
            for entry, s in stats.items() if getattr(s, field_name) is not None}


def _merge(parts: Iterable[dict[str, InputStatistics]]) -> dict[str, InputStatistics]:
    merged: dict[str, InputStatistics] = {}
    for part in parts:
        for entry, s in part.items():
            into = merged.setdefault(entry, InputStatistics(tokens=s.tokens))
            for f in InputStatistics.TENSOR_FIELDS:
                if getattr(s, f) is not None:
                    setattr(into, f, getattr(s, f))
    return merged


class JsonCache:
    """Small JSON records (e.g. dense-model metrics) keyed by content."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = Path(root) / kind

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.root / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("cache: ignoring unreadable %s (%s); it will be recomputed", path, exc)
            return None

    def save(self, key: str, value: dict[str, Any]) -> None:
        atomic_write_json(self.root / f"{key}.json", value)
