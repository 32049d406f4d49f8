"""Putting a rank plan into a model: for good (:func:`apply_plan`) or for one evaluation
(:func:`plan_applied`, used to score candidate plans)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lrc.budget import is_low_rank
from lrc.factorizers.base import Decomposition
from lrc.model.adapters import TargetLinear
from lrc.model.layers import LowRankLinear, replace_module


def low_rank_layer(dense: nn.Linear, dec: Decomposition, rank: int) -> LowRankLinear:
    """The rank-``rank`` replacement of ``dense`` (its bias kept, plus the factorizer's bias
    correction when it has one)."""
    weight = dense.weight
    B, A = dec.factors(rank, dtype=weight.dtype)
    bias, correction = dense.bias, dec.bias_correction(rank)
    if correction is not None:  # keeps the output mean (feature_pca)
        correction = correction.to(device=weight.device, dtype=weight.dtype)
        bias = correction if bias is None else bias.detach() + correction
    return LowRankLinear.from_factors(B.to(weight.device), A.to(weight.device), bias)


def apply_plan(model: nn.Module, targets: list[TargetLinear], plan: Mapping[str, int],
               decompose: Callable[[str], Decomposition], decompositions: dict[str, Decomposition]
               ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Swap every target whose planned rank saves parameters for a LowRankLinear.

    Uses (and frees) a decomposition from ``decompositions`` when one was computed already,
    else decomposes on the spot. Returns per-matrix truncation errors and the factorizer's
    diagnostics (whitening damping, precision fallbacks, ...).
    """
    errors, notes = {}, {}
    for t in tqdm(targets, desc="factorize", leave=False, disable=None):
        rank = plan[t.name]
        if not is_low_rank(t.shape, rank):
            continue  # kept dense: factors would not be smaller
        dec = decompositions.pop(t.name, None) or decompose(t.name)
        errors[t.name] = dec.truncation_error(rank)
        notes[t.name] = dec.diagnostics
        replace_module(model, t.name, low_rank_layer(model.get_submodule(t.name), dec, rank))
    return errors, notes


@contextmanager
def plan_applied(model: nn.Module, targets: list[TargetLinear], plan: Mapping[str, int],
                 decompositions: Mapping[str, Decomposition]) -> Iterator[nn.Module]:
    """The model with ``plan`` swapped in for the duration of the block; restored afterwards,
    whatever happens."""
    originals: dict[str, nn.Module] = {}
    try:
        for t in targets:
            rank = plan[t.name]
            if is_low_rank(t.shape, rank):
                originals[t.name] = replace_module(
                    model, t.name, low_rank_layer(model.get_submodule(t.name), decompositions[t.name], rank))
        yield model
    finally:
        for name, module in originals.items():
            replace_module(model, name, module)
