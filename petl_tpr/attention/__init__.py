"""Attention takeover: `attend` (SDPA with prefixes and masks) and one convention per call style.

A family's `BlockLayout.attention` names its convention in `CONVENTIONS`; a family without one
cannot take prefixes, and its raw-weight projections cannot take deltas.
"""

from .core import MAX_PREFIX_LENGTH, attend
from .hf import HFAttention
from .mha import MHAAttention
from .relbias import RelativeBiasAttention
from .rotary import RotaryAttention
from .takeover import Convention, TakeoverState, is_taken_over, release, state_of, take_over
from .timm import TimmAttention

CONVENTIONS: dict[str, Convention] = {c.name: c for c in (HFAttention(), MHAAttention(), RotaryAttention(), TimmAttention(),
                                                           RelativeBiasAttention())}

__all__ = ["CONVENTIONS", "Convention", "MAX_PREFIX_LENGTH", "TakeoverState", "attend", "is_taken_over", "release",
           "state_of", "take_over"]
