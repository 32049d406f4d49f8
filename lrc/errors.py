"""Errors that reach the user as one clear line (never a deep torch traceback)."""


class LrcError(Exception):
    """Base class: the message names the bad value and what would be accepted."""


class ConfigError(LrcError, ValueError):
    """A configuration value is out of range, unknown or inconsistent."""


class DataError(LrcError):
    """Input data (a text file, a model path, a cache entry) is missing or unusable."""


class NumericalError(LrcError, ArithmeticError):
    """A computation produced a non-finite value where a finite one is required."""


class BudgetError(LrcError):
    """A rank plan violates the parameter budget."""
