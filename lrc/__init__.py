"""lrc: low-rank (SVD-based) compression of large language models.

The pipeline reads top to bottom in :func:`lrc.pipeline.compress_and_evaluate`;
only :mod:`lrc.run` sees the Hydra config.
"""

from lrc.errors import LrcError

__all__ = ["LrcError"]
__version__ = "0.1.0"
