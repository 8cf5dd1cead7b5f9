"""The tpr package's public names import cleanly and lazily."""

from __future__ import annotations

import subprocess
import sys

import petl_tpr.tpr as tpr
from petl_tpr.errors import PetlError


def test_public_names_resolve():
    for name in tpr.__all__:
        assert getattr(tpr, name) is not None, name
    assert issubclass(tpr.DatasetError, PetlError) and issubclass(tpr.TokenizerError, PetlError)
    assert issubclass(tpr.TaskInputError, ValueError)


def test_import_needs_neither_pillow_nor_torchvision():
    code = "import sys, petl_tpr.tpr; print('PIL' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_check_int_is_the_one_int_validator():
    """Every config of the task validates its ints through `errors.check_int` (bools refused)."""
    import pytest

    from petl_tpr.tpr.errors import TaskInputError, check_int
    from petl_tpr.tpr.training.schedule import OptimConfig
    from petl_tpr.tpr.data.transforms import TransformConfig

    check_int("x", 3)
    check_int("x", 0, 0)
    for bad, minimum, message in ((0, 1, "x must be a positive int, got 0"), (True, 1, "positive int, got True"),
                                  (2.0, 1, "got 2.0"), (-1, 0, "x must be an int >= 0, got -1")):
        with pytest.raises(TaskInputError, match=message):
            check_int("x", bad, minimum)
    with pytest.raises(TaskInputError, match="TransformConfig.padding must be an int >= 0"):
        TransformConfig(padding=-1)
    with pytest.raises(TaskInputError, match="OptimConfig.warmup_steps must be an int >= 0, got True"):
        OptimConfig(warmup_steps=True)


def test_rooms_and_old_flat_paths():
    """The package is four rooms; each old flat module path imports the moved module itself."""
    import importlib
    from pathlib import Path

    from petl_tpr.tpr._moved import MOVED

    root = Path(tpr.__file__).parent
    assert sorted(p.name for p in root.iterdir() if p.suffix == ".py") == ["__init__.py", "_moved.py", "errors.py"]
    rooms = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    assert rooms == {"data", "model", "training", "demo"}
    for old, new in MOVED.items():
        assert (root / (new.replace(".", "/") + ".py")).exists(), new
        moved = importlib.import_module(f"petl_tpr.tpr.{old}")
        assert moved is importlib.import_module(f"petl_tpr.tpr.{new}"), old
    import petl_tpr.tpr.trainer as flat
    from petl_tpr.tpr.training import trainer
    assert flat is trainer and flat.train is tpr.train
    from petl_tpr.tpr.demo import METHODS, DemoConfig, run_demo   # the demo package keeps the old names
    assert METHODS[0] == "zero-shot" and callable(run_demo) and DemoConfig.quick
    with __import__("pytest").raises(ModuleNotFoundError):
        importlib.import_module("petl_tpr.tpr.no_such_module")
