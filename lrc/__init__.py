"""lrc: low-rank (SVD-based) compression of large language models.

A run reads top to bottom in :func:`lrc.pipeline.compress_and_evaluate`; the folders are its
stages (``data``, ``stats``, ``compress``, ``eval``, ``results``; ``model``; the maths in
``allocators`` and ``factorizers``). Only :mod:`lrc.run` and :mod:`lrc.config` see Hydra.
"""

from lrc.errors import LrcError


def load_compressed(path, device="cpu", dtype=None):
    """A compressed checkpoint (``save=true`` or ``python -m lrc.export``): (model, tokenizer)."""
    from lrc.model.checkpoint import load_compressed as load

    return load(path, device=device, dtype=dtype)


__all__ = ["LrcError", "load_compressed"]
__version__ = "0.1.0"
