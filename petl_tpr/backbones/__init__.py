"""Backbone families. Importing this package registers every built-in family."""

from . import hf_bert, hf_clip, hf_decoder, hf_vit, open_clip, timm_vit, torch_mha  # noqa: F401  (registration)
from . import plain  # noqa: F401,E402  (registered last: the structural fallback)
from .discover import Backbone, discover
from .layout import Block, BlockLayout, Branch, Family, Projection, ProjectionRef

__all__ = ["Backbone", "Block", "BlockLayout", "Branch", "Family", "Projection", "ProjectionRef", "discover"]
