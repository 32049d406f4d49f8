"""The allocator protocol.

An allocator never sees weights: it gets each target matrix's shape, position and
(optionally) the spectrum its factorizer would truncate, plus the parameter budget,
and returns a rank plan ``{module name: rank}``. The pipeline checks every plan with
:func:`lrc.budget.check_plan`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lrc.budget import Budget, Shape

RankPlan = dict[str, int]
ScoreFn = Callable[[Mapping[str, int]], float]  # rank plan -> validation loss (lower is better)


@dataclass(frozen=True)
class MatrixInfo:
    """What an allocator may know about one target matrix."""

    name: str
    shape: Shape
    block: int  # decoder block index
    sublayer: str  # "attn" | "mlp"
    kind: str  # projection type, e.g. "q_proj"
    spectrum: torch.Tensor | None = None  # descending, in the factorizer's loss metric


class Allocator(ABC):
    """Splits a :class:`~lrc.budget.Budget` into ranks.

    ``needs_spectra``: the pipeline must decompose every matrix before allocating.
    ``needs`` names extra calibration statistics (e.g. sublayer cosine similarity).
    """

    needs_spectra: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def allocate(self, matrices: Sequence[MatrixInfo], budget: Budget, score: ScoreFn | None = None) -> RankPlan:
        """Return a rank for every matrix in ``matrices``."""

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **{k: str(v) for k, v in vars(self).items()}}
