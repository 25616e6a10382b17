"""The public API: ``import fedlt`` is cheap, and every exported name of fedlt and its packages exists."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["fedlt", "fedlt.cli", "fedlt.data", "fedlt.engine", "fedlt.methods", "fedlt.models", "fedlt.metrics",
            "fedlt.callbacks"]


def test_import_fedlt_imports_nothing_heavy():
    code = "import sys, fedlt; print(sorted(m for m in ('torch', 'lightning', 'wandb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_exists(name):
    package = importlib.import_module(name)
    assert package.__all__, name
    missing = [n for n in package.__all__ if not hasattr(package, n)]
    assert not missing, f"{name} exports names it does not define: {missing}"


def test_the_package_is_marked_typed():
    assert (Path(importlib.import_module("fedlt").__file__).parent / "py.typed").is_file()
