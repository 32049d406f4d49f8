"""Statistics kinds: the names a factorizer or allocator puts in its ``needs``.

``gram``, ``mean_abs``, ``mean`` (input kinds), ``pooled_cov:K`` (Bolaco, K groups),
``fisher`` (FWSVD) and ``cosine`` (MGAA); see :mod:`lrc.stats.collect` for what each holds.
"""

from __future__ import annotations

from lrc.errors import ConfigError

INPUT_KINDS = frozenset({"gram", "mean_abs", "mean"})


POOLED = "pooled_cov"


FISHER = "fisher"


COSINE = "cosine"


def parse_kind(kind: str) -> tuple[str, int | None]:
    """``"pooled_cov:32"`` -> ("pooled_cov", 32); other kinds have no parameter."""
    name, _, arg = kind.partition(":")
    if name == POOLED:
        if not arg.isdigit() or int(arg) < 1:
            raise ConfigError(f"statistics kind {kind!r}: pooled covariance needs a group count >= 1")
        return name, int(arg)
    if arg or name not in INPUT_KINDS | {FISHER, COSINE}:
        known = sorted(INPUT_KINDS | {FISHER, COSINE, f"{POOLED}:K"})
        raise ConfigError(f"unknown statistics kinds [{kind!r}]; known: {known}")
    return name, None


def kind_field(kind: str) -> str:
    """The InputStatistics field a statistics kind fills (``pooled_cov:32`` -> ``pooled_cov``)."""
    return parse_kind(kind)[0]
