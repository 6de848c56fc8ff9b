"""Importing ``scripts/*.py`` in tests (``scripts/`` is a folder of programs, not a package)."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load_script(name: str) -> ModuleType:
    """``scripts/{name}.py`` as a module, registered in ``sys.modules`` (dataclasses resolve
    their annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
