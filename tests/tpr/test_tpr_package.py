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
