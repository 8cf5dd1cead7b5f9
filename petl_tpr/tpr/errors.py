"""Errors of the retrieval task. All derive from `petl_tpr.errors.PetlError`."""

from __future__ import annotations

from ..errors import PetlError


class TaskInputError(PetlError, ValueError):
    """A tensor or value handed to a metric, loss or config does not fit (shape, dtype, range)."""


class DatasetError(PetlError, ValueError):
    """An annotation file or image is missing, malformed, or points outside the dataset root."""


def check_int(what: str, value, minimum: int = 1) -> None:
    """TaskInputError unless `value` is an int (a bool is not) of at least `minimum`; `what` names
    the setting in the message (e.g. "TrainConfig.batch_size")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise TaskInputError(f"{what} must be {bound}, got {value!r}")


class TokenizerError(PetlError):
    """The BPE vocabulary cannot be found or read, or a token id is out of range."""
