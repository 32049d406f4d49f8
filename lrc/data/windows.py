"""Deterministic token windows from a text source, and the run's :class:`Calibration`.

Sampling follows the papers: ``stream`` joins the text into one token stream and draws
``nsamples`` random windows of ``seqlen`` tokens (WikiText-2 in SVD-LLM); ``documents``
draws a random document at least ``seqlen`` tokens long, then a random window in it (C4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lrc.errors import ConfigError, DataError

SAMPLING = ("stream", "documents")


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
    """Token windows (nsamples x seqlen) drawn deterministically from ``source`` (a mixture of
    sources draws each component's share from it alone: :mod:`lrc.data.mixture`)."""
    if sampling not in SAMPLING:
        raise ConfigError(f"sampling={sampling!r} is not one of {SAMPLING}")
    if hasattr(source, "windows"):
        _check_sizes(nsamples, seqlen)
        return source.windows(lambda part, n, part_seed: calibration_windows(part, tokenizer, n, seqlen, part_seed,
                                                                              sampling), nsamples, seed)
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
