"""Allocators: how the global parameter budget is split into per-matrix ranks."""

from lrc.allocators.base import Allocator, MatrixInfo

__all__ = ["Allocator", "MatrixInfo"]
