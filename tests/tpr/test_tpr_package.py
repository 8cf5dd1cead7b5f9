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
    from petl_tpr.tpr.schedule import OptimConfig
    from petl_tpr.tpr.transforms import TransformConfig

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
