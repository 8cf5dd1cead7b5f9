"""The demo room: `petl-tpr demo` (`run`: steps, settings, caching), its report (`report`: table,
JSON, plot), the retrieval pictures (`pictures`) and several seeds (`seeds`). See docs/demo.md."""

from .run import BACKBONES, METHODS, DemoConfig, run_demo
from .seeds import run_seeds

__all__ = ["BACKBONES", "METHODS", "DemoConfig", "run_demo", "run_seeds"]
