"""PETL methods. Importing this package registers every built-in method."""

from . import bottleneck, l_adapter, lora, moa, prefix, unipt  # noqa: F401  (registration)
from .base import Method

__all__ = ["Method"]
