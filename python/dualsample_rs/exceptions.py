"""Exceptions raised by dualsample_rs.

Every error the package raises derives from :class:`DualSampleError`. Bad input raises
:class:`InvalidInputError`, which is also a :class:`ValueError`, so ``except ValueError``
keeps working; an array of a dtype that cannot be converted safely raises
:class:`InvalidDtypeError`, which is also a :class:`TypeError`.
"""

from __future__ import annotations

__all__ = ["DualSampleError", "InvalidDtypeError", "InvalidInputError"]


class DualSampleError(Exception):
    """Base class of every error dualsample_rs raises."""


class InvalidInputError(DualSampleError, ValueError):
    """An argument is out of range or malformed; the message names it and, where it
    concerns one, the row."""


class InvalidDtypeError(InvalidInputError, TypeError):
    """An array has a dtype that cannot be converted safely to the one expected."""
