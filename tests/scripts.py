"""The repository's scripts (benchmarks/*.py, tools/*.py) as modules for the tests: they are
not packages, so they are loaded by path, each call a fresh module."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def load_script(path: str) -> ModuleType:
    """``path`` relative to the repository root, e.g. ``"benchmarks/plan_time.py"``."""
    file = REPO / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
