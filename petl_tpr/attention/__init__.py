"""Attention takeover: `attend` (SDPA with prefixes and masks) and one convention per call style.

A family's `BlockLayout.attention` names its convention in `CONVENTIONS`; a family without one
cannot take prefixes, and its raw-weight projections cannot take deltas.
"""

from .core import MAX_PREFIX_LENGTH, attend
from .disentangled import DisentangledAttention
from .fused import FusedQKVAttention
from .hf import HFAttention
from .intercept import InterceptAttention
from .mha import MHAAttention
from .relbias import RelativeBiasAttention
from .rotary import RotaryAttention
from .takeover import Convention, TakeoverState, is_taken_over, release, state_of, take_over
from .timm import TimmAttention

CONVENTIONS: dict[str, Convention] = {c.name: c for c in (HFAttention(), MHAAttention(), RotaryAttention(), TimmAttention(),
                                                           RelativeBiasAttention(), InterceptAttention(),
                                                           FusedQKVAttention(), DisentangledAttention())}


def recognised_convention(module) -> str | None:
    """The convention that recognises `module` by its structure (for blocks whose family names none), or None."""
    return next((c.name for c in CONVENTIONS.values() if c.recognises(module)), None)

__all__ = ["CONVENTIONS", "Convention", "recognised_convention", "MAX_PREFIX_LENGTH", "TakeoverState", "attend", "is_taken_over", "release",
           "state_of", "take_over"]
