"""What a run produced, as plain data: the record and the W&B logs are both made from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lrc.resources import Usage

# name -> (columns, rows): tables logged to W&B (rank plan, an allocator's or a benchmark's tables)
Tables = dict[str, tuple[list[str], list[list[Any]]]]


@dataclass
class Outcome:
    """Everything a run produced, ready for the record and the tracker."""

    ranks: dict[str, int]
    params: dict[str, float]
    metrics: dict[str, float]
    dense_metrics: dict[str, float]
    usage: Usage
    diagnostics: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)  # plans scored by a search allocator
    tables: Tables = field(default_factory=dict)
