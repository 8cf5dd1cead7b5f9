"""Errors of the retrieval task. All derive from `petl_tpr.errors.PetlError`."""

from __future__ import annotations

from ..errors import PetlError


class TaskInputError(PetlError, ValueError):
    """A tensor or value handed to a metric, loss or config does not fit (shape, dtype, range)."""


class DatasetError(PetlError, ValueError):
    """An annotation file or image is missing, malformed, or points outside the dataset root."""


class TokenizerError(PetlError):
    """The BPE vocabulary cannot be found or read, or a token id is out of range."""
