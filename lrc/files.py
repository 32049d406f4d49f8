"""Content keys and atomic writes, used by the caches, checkpoints and records alike."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lrc.errors import DataError

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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        os.close(fd)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _unwritable(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unwritable(path: Path, exc: OSError) -> DataError:
    return DataError(f"cannot write {path}: {exc.strerror or exc} (a full disk or a folder not writable?)")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


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


def save_checked(path: Path, key: str, tensors: dict[str, Any], meta: dict[str, str]) -> Path:
    """Tensors as one safetensors file, atomically, with their key and a sha256 of their bytes."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**meta, "key": key, "sha256": content_digest(tensors)})
    return path


def load_checked(path: Path, key: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    """(tensors, metadata) of a file written by :func:`save_checked` under ``key``; None (and a
    warning) when it is missing, unreadable, another key's or not the bytes it was written with."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        if meta.get("key") != key:
            raise ValueError(f"key mismatch ({meta.get('key')})")
        if meta.get("sha256") != content_digest(tensors):
            raise ValueError("content hash mismatch")
    except (SafetensorError, OSError, ValueError) as exc:
        log.warning("ignoring unreadable cache file %s (%s); it will be recomputed", path, exc)
        return None
    return tensors, meta


def content_digest(tensors: dict[str, Any]) -> str:
    """sha256 over every tensor's name and bytes (sorted): a file that does not match is not used."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy())  # no copy
    return h.hexdigest()
