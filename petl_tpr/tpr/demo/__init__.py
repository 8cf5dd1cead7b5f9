"""The demo room: `petl-tpr demo` (`run`: steps, settings, caching) and its report (`report`: table,
JSON, plot). See docs/demo.md."""

from .run import BACKBONES, METHODS, DemoConfig, run_demo

__all__ = ["BACKBONES", "METHODS", "DemoConfig", "run_demo"]
