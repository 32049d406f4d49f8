"""The statistics cache: one safetensors file per statistics kind, content-keyed, shared by a sweep."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from lrc.errors import DataError
from lrc.files import cache_key, load_checked, save_checked
from lrc.model.adapters import TargetLinear
from lrc.stats.kinds import kind_field
from lrc.stats.storage import StatisticsStorage
from lrc.stats.types import InputStatistics

log = logging.getLogger(__name__)


def statistics_key(base: Mapping[str, Any], targets: Iterable[TargetLinear], **where: Any) -> dict[str, Any]:
    """Cache key (plain data) of the statistics of ``targets``: ``base`` names the model and the
    calibration set, ``where`` the mode (and in layer-wise mode the block and what it was fed)."""
    return {**base, **where, "targets": sorted({(t.group, t.shape[1]) for t in targets})}


class StatisticsCache:
    """Calibration statistics, one safetensors file per statistics kind.

    A run that needs kinds A and B reuses A computed by an earlier run and computes only B.
    Tensors are stored as ``storage`` says (:mod:`lrc.stats.storage`); the metadata holds the
    key and token counts, and a file whose key or contents do not check out is ignored (and
    recomputed), never half-read. Statistics a run computes are rounded through the stored form
    even when ``storage.write`` is off, so caching never changes a result.
    """

    def __init__(self, root: Path, storage: StatisticsStorage | None = None) -> None:
        self.root = Path(root) / "stats"
        self.storage = storage or StatisticsStorage()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """An exclusive file lock across processes and nodes sharing this cache folder (the OS
        drops it when its holder dies, even by SIGKILL)."""
        from filelock import FileLock, Timeout

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.root / f"{key}.lock"))
            try:
                lock.acquire(blocking=False)
            except Timeout:
                log.info("statistics: another job is computing them; waiting for %s", lock.lock_file)
                lock.acquire()
        except OSError as exc:
            raise DataError(f"cannot write the statistics cache {self.root}: {exc.strerror or exc}") from None
        try:
            yield
        finally:
            lock.release()

    def load(self, key: str) -> dict[str, InputStatistics] | None:
        found = load_checked(self.path(key), key)
        if found is None:
            return None
        tensors, meta = found
        try:
            return self.storage.unpack(tensors, json.loads(meta["tokens"]))
        except (KeyError, ValueError) as exc:
            log.warning("ignoring unreadable statistics cache %s: %s", self.path(key), exc)
            return None

    def keep(self, key: str, stats: dict[str, InputStatistics]) -> dict[str, InputStatistics]:
        """``stats`` in their stored form (written to the cache unless ``storage.write`` is off),
        as a later run reads them back."""
        tokens = {entry: s.tokens for entry, s in stats.items()}
        tensors = self.storage.pack(stats)
        if self.storage.write:
            save_checked(self.path(key), key, tensors, {"tokens": json.dumps(tokens)})
        return self.storage.unpack(tensors, tokens)

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
            # One job computes, concurrent jobs (a SLURM sweep) wait on the lock and then load it;
            # a run that writes nothing has nothing to wait for.
            with self.lock(cache_key(base)) if self.storage.write else nullcontext():
                parts.update({kind: self.load(keys[kind]) for kind in missing})
                missing = frozenset(kind for kind, part in parts.items() if part is None)
                if missing:
                    fresh = compute(missing)
                    for kind in missing:
                        parts[kind] = self.keep(keys[kind], _only(fresh, kind_field(kind)))
                        info("statistics: computed %s, %s", kind, f"cached at {self.path(keys[kind])}"
                             if self.storage.write else "not written (statistics.write=false)")
        cached = frozenset(kinds) - missing
        if cached:
            info("statistics: reused cached %s", ", ".join(sorted(cached)))
        return _merge(parts.values()), cached


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
