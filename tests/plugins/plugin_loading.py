"""Importing a plugin in tests the way the worker does: a fresh module object from its file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"


def load_plugin(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"kefu_plugin_test_{name}", PLUGINS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
