"""Factorizers: how one matrix is truncated to a given rank (see ``base.Factorizer``)."""

from lrc.factorizers.base import Decomposition, Factorizer
from lrc.stats.types import InputStatistics

__all__ = ["Decomposition", "Factorizer", "InputStatistics"]
