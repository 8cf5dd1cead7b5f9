"""The old flat module paths of `petl_tpr.tpr` (before the data/model/training/demo rooms) still
import: `import petl_tpr.tpr.trainer` gives the module `petl_tpr.tpr.training.trainer` itself (the same
object, so a monkeypatch through either name is seen by both). New code imports the public names
from `petl_tpr.tpr`, or the room paths."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

PACKAGE = __name__.rsplit(".", 1)[0]
MOVED = {**{name: f"data.{name}" for name in ("bpe", "tokenizer", "masking", "transforms", "datasets", "torch_data",
                                              "synthetic", "synthetic_draw", "synthetic_text")},
         **{name: f"model.{name}" for name in ("clip_files", "position")}, "models": "model.dual_encoder",
         **{name: f"training.{name}" for name in ("trainer", "schedule", "losses", "distributed", "run_files",
                                                  "run_config", "evaluation", "metrics")},
         "demo_report": "demo.report"}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `petl_tpr.tpr.<old name>` and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent == PACKAGE and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{PACKAGE}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module) -> None:
        pass    # already executed at its new path


if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedFinder())
