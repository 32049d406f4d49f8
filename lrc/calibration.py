"""Deterministic token windows from a text source.

Sources (each a small dataclass with ``text()`` / ``documents()`` and ``describe()``):

* :class:`EmbeddedText` - the public-domain corpus shipped in ``lrc/data`` (offline default),
  split by character position into disjoint calibration / validation / test parts;
* :class:`TextFile` - a plain-text file, or every ``*.txt`` in a folder;
* :class:`PythonDocs` - the Python Language Reference shipped with CPython (out-of-domain text);
* :class:`HFDataset` - WikiText-2, C4, PTB ... through ``datasets`` (needs the hub; also
  reads local files in the same format with ``path=json`` / ``data_files=``).

Sampling follows the papers: ``stream`` joins the text into one token stream and draws
``nsamples`` random windows of ``seqlen`` tokens (WikiText-2 in SVD-LLM); ``documents``
draws a random document at least ``seqlen`` tokens long, then a random window in it (C4).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lrc.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EMBEDDED_FILE = "britannica_1911_shakespeare.txt"
# The embedded corpus is cut at paragraph ends into chunks of about CHUNK_CHARS characters;
# chunk i belongs to split SPLIT_PATTERN[i % 5]. The splits are disjoint and, like WikiText-2's
# train and test, drawn from the same text (a contiguous cut would calibrate on the biography
# and test on the play chronology: a domain shift that no paper's protocol has).
CHUNK_CHARS = 2000
SPLIT_PATTERN = ("calibration", "calibration", "test", "calibration", "validation")
EMBEDDED_SPLITS = frozenset(SPLIT_PATTERN)
SAMPLING = ("stream", "documents")


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
    """A UTF-8 text file, or every ``*.txt`` file of a folder (sorted, one document each)."""

    path: str

    def _files(self) -> list[Path]:
        path = Path(self.path).expanduser()
        if path.is_file():
            return [path]
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if files:
                return files
            raise DataError(f"text folder {self.path!r} contains no *.txt files")
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


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """One 1-D LongTensor of token ids for ``text`` (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_starts(length: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Start positions of ``nsamples`` random windows of ``seqlen`` tokens in a stream of ``length``."""
    _check_sizes(nsamples, seqlen)
    if length < seqlen:
        raise DataError(f"calibration text has {length} tokens, shorter than one window of seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, length - seqlen + 1, (nsamples,), generator=gen).tolist()


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from one stream (nsamples x seqlen)."""
    return torch.stack([ids[s:s + seqlen] for s in sample_starts(ids.numel(), nsamples, seqlen, seed)])


def sample_document_windows(documents: list[str], tokenizer: Any, nsamples: int, seqlen: int, seed: int,
                            max_draws: int = 100_000) -> torch.Tensor:
    """C4-style: a random document with more than ``seqlen`` tokens, then a random window in it."""
    _check_sizes(nsamples, seqlen)
    if not documents:
        raise DataError("calibration source has no documents")
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for _ in range(max_draws):
        if len(windows) == nsamples:
            break
        doc = documents[int(torch.randint(len(documents), (1,), generator=gen))]
        ids = tokenize(tokenizer, doc)
        if ids.numel() <= seqlen:
            continue
        start = int(torch.randint(0, ids.numel() - seqlen, (1,), generator=gen))
        windows.append(ids[start:start + seqlen])
    if len(windows) < nsamples:
        raise DataError(f"found only {len(windows)} documents longer than seqlen={seqlen} tokens "
                        f"in {max_draws} draws; need nsamples={nsamples}")
    return torch.stack(windows)


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if not isinstance(nsamples, int) or nsamples < 1:
        raise ConfigError(f"nsamples={nsamples!r} must be a positive integer")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"seqlen={seqlen!r} must be an integer >= 2")


def calibration_windows(source: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int,
                        sampling: str = "stream") -> torch.Tensor:
    """Token windows (nsamples x seqlen) drawn deterministically from ``source``."""
    if sampling not in SAMPLING:
        raise ConfigError(f"sampling={sampling!r} is not one of {SAMPLING}")
    if sampling == "documents":
        return sample_document_windows(source.documents(), tokenizer, nsamples, seqlen, seed)
    return sample_windows(tokenize(tokenizer, source.text()), nsamples, seqlen, seed)


def held_out_windows(ids: torch.Tensor, taken: list[tuple[int, int]], nsamples: int, seqlen: int,
                     seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``ids`` that share no token position with any ``(start, length)`` in ``taken``.

    The stream is cut into consecutive ``seqlen`` tiles; tiles overlapping a taken (calibration)
    window are excluded, so validation never sees a calibration token position.
    """
    _check_sizes(nsamples, seqlen)
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for start, length in taken:
        used[start:start + length] = True
    tiles = [i for i in range(0, ids.numel() - seqlen + 1, seqlen) if not used[i:i + seqlen].any()]
    if len(tiles) < nsamples:
        raise DataError(f"only {len(tiles)} validation windows of seqlen={seqlen} are disjoint from the "
                        f"calibration windows; need nsamples={nsamples} (set calibration.validation to a "
                        "held-out text)")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(tiles), generator=gen)[:nsamples].sort().values
    return torch.stack([ids[tiles[i]:tiles[i] + seqlen] for i in chosen.tolist()])


@dataclass(frozen=True)
class Calibration:
    """What calibration data a run uses: ``nsamples`` x ``seqlen`` windows drawn with ``seed``.

    ``validation`` is an optional held-out text source (e.g. the embedded corpus's validation
    split, WikiText-2 validation) for allocators that score candidate plans; without one,
    validation windows are held-out tiles of the calibration text (see :func:`held_out_windows`).
    """

    source: Any
    nsamples: int = 16
    seqlen: int = 512
    seed: int = 0
    sampling: str = "stream"
    batch_size: int = 4
    validation: Any = None

    def __post_init__(self) -> None:
        _check_sizes(self.nsamples, self.seqlen)
        if self.sampling not in SAMPLING:
            raise ConfigError(f"sampling={self.sampling!r} is not one of {SAMPLING}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be a positive integer")

    def windows(self, tokenizer: Any) -> torch.Tensor:
        return calibration_windows(self.source, tokenizer, self.nsamples, self.seqlen, self.seed, self.sampling)

    def validation_windows(self, tokenizer: Any, nsamples: int, seqlen: int) -> torch.Tensor:
        """Held-out windows for scoring plans: never calibration text, never benchmark text."""
        if self.validation is not None:
            return calibration_windows(self.validation, tokenizer, nsamples, seqlen, self.seed, self.sampling)
        if self.sampling != "stream":
            raise ConfigError("validation windows need calibration.validation (a held-out text source) "
                              f"when sampling={self.sampling!r}")
        ids = tokenize(tokenizer, self.source.text())
        taken = [(start, self.seqlen) for start in sample_starts(ids.numel(), self.nsamples, self.seqlen, self.seed)]
        return held_out_windows(ids, taken, nsamples, seqlen, self.seed)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source.describe(), "nsamples": self.nsamples, "seqlen": self.seqlen,
                "seed": self.seed, "sampling": self.sampling}
