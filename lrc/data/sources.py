"""Text sources, each a small dataclass with ``text()`` / ``documents()`` and ``describe()``:

* :class:`EmbeddedText` - the public-domain corpus shipped in ``lrc/data`` (offline default),
  split by character position into disjoint calibration / validation / test parts;
* :class:`TextFile` - a plain-text file, or every ``*.txt`` in a folder;
* :class:`PythonDocs` - the Python Language Reference shipped with CPython (out-of-domain text);
* :class:`HFDataset` - WikiText-2, C4, PTB ... through ``datasets`` (needs the hub; also
  reads local files in the same format with ``path=json`` / ``data_files=``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lrc.errors import ConfigError, DataError

EMBEDDED_FILE = "britannica_1911_shakespeare.txt"


# The embedded corpus is cut at paragraph ends into chunks of about CHUNK_CHARS characters;
# chunk i belongs to split SPLIT_PATTERN[i % 5]. The splits are disjoint and, like WikiText-2's
# train and test, drawn from the same text (a contiguous cut would calibrate on the biography
# and test on the play chronology: a domain shift that no paper's protocol has).
CHUNK_CHARS = 2000


SPLIT_PATTERN = ("calibration", "calibration", "test", "calibration", "validation")


EMBEDDED_SPLITS = frozenset(SPLIT_PATTERN)


def _embedded_corpus() -> str:
    return resources.files("lrc").joinpath("data", EMBEDDED_FILE).read_text(encoding="utf-8")


def embedded_chunks() -> list[str]:
    """The embedded corpus in order, cut at paragraph ends into chunks of >= CHUNK_CHARS characters
    (a paragraph longer than that is cut at its sentence ends)."""
    pieces: list[str] = []
    for para in _embedded_corpus().split("\n\n"):
        while len(para) > 2 * CHUNK_CHARS:  # OCR pages come as one long paragraph
            cut = para.find(". ", CHUNK_CHARS)
            if cut < 0:
                break
            pieces.append(para[:cut + 1])
            para = para[cut + 2:]
        pieces.append(para)
    chunks, current = [], ""
    for piece in pieces:
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) >= CHUNK_CHARS:
            chunks.append(current)
            current = ""
    if current:
        chunks.append(current)
    return chunks


@dataclass(frozen=True)
class EmbeddedText:
    """A split of the embedded corpus (1911 Britannica, public domain; see lrc/data/README.md)."""

    split: str = "calibration"

    def chunks(self) -> list[str]:
        if self.split not in EMBEDDED_SPLITS:
            raise ConfigError(f"split={self.split!r} is not one of {sorted(EMBEDDED_SPLITS)}")
        return [c for i, c in enumerate(embedded_chunks()) if SPLIT_PATTERN[i % len(SPLIT_PATTERN)] == self.split]

    def text(self) -> str:
        return "\n\n".join(self.chunks())

    def documents(self) -> list[str]:
        return self.chunks()

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.text().encode()).hexdigest()[:16]  # the exact text of this split
        return {"source": "embedded", "file": EMBEDDED_FILE, "sha256": digest, **asdict(self)}


@dataclass(frozen=True)
class TextFile:
    """A UTF-8 text file, or every file of a folder matching ``pattern`` (sorted, one document
    each; a file reached twice through links is read once)."""

    path: str
    pattern: str = "*.txt"

    def _files(self) -> list[Path]:
        path = Path(self.path).expanduser()
        if path.is_file():
            return [path]
        if path.is_dir():
            files, seen = [], set()
            for f in sorted(path.rglob(self.pattern)):
                if f.is_file() and f.resolve() not in seen:
                    seen.add(f.resolve())
                    files.append(f)
            if files:
                return files
            raise DataError(f"text folder {self.path!r} contains no files matching {self.pattern!r}")
        raise DataError(f"text path {self.path!r} does not exist")

    def documents(self) -> list[str]:
        docs = []
        for f in self._files():
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"text file {str(f)!r} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        return docs

    def text(self) -> str:
        return "\n\n".join(self.documents())

    def describe(self) -> dict[str, Any]:
        files = self._files()
        return {"source": "textfile", "files": [str(f.resolve()) for f in files],
                "sizes": [f.stat().st_size for f in files], "mtimes": [f.stat().st_mtime_ns for f in files]}


@dataclass(frozen=True)
class PythonDocs:
    """The Python Language Reference topics that ship with every CPython (``pydoc_data.topics``).

    Modern technical English of another genre than the embedded 1911 encyclopaedia, offline
    wherever Python runs: lrc's out-of-domain text, never used for tuning. Topics in sorted
    order, one document each (about 750 KB).
    """

    def documents(self) -> list[str]:
        from pydoc_data.topics import topics

        return [topics[key].strip() for key in sorted(topics)]

    def text(self) -> str:
        return "\n\n".join(self.documents())

    def describe(self) -> dict[str, Any]:
        import sys

        digest = hashlib.sha256(self.text().encode()).hexdigest()[:16]
        return {"source": "python_docs", "python": sys.version.split()[0], "sha256": digest}


@dataclass(frozen=True)
class HFDataset:
    """A dataset through ``datasets.load_dataset`` (WikiText-2, C4, PTB, or local json/parquet)."""

    path: str = "wikitext"
    name: str | None = "wikitext-2-raw-v1"
    split: str = "train"
    column: str = "text"
    data_files: Any = None
    joiner: str = "\n\n"

    def documents(self) -> list[str]:
        import datasets

        try:
            ds = datasets.load_dataset(self.path, self.name, split=self.split, data_files=self.data_files)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; one clear line for the user
            raise DataError(f"cannot load dataset {self.path!r} ({self.name}, split {self.split}): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if self.column not in ds.column_names:
            raise DataError(f"dataset {self.path!r} has no column {self.column!r} (columns: {ds.column_names})")
        return list(ds[self.column])

    def text(self) -> str:
        return self.joiner.join(self.documents())

    def describe(self) -> dict[str, Any]:
        return {"source": "hf", **{k: (str(v) if k == "data_files" else v) for k, v in asdict(self).items()}}
