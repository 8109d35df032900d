"""k8s/README.md's runbook stays pasteable: its shell parses, its routes parse, its names exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.llm_worker.routes import parse_routes

README = Path(__file__).resolve().parents[2] / "k8s" / "README.md"


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def test_runbook_shell_blocks_are_valid_bash(readme: str, tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    blocks = shell_blocks(readme)
    assert len(blocks) >= 8
    for block in blocks:
        script = tmp_path / "block.sh"
        script.write_text(block, encoding="utf-8")
        result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{result.stderr}\n{block}"


def test_runbook_routes_files_parse_and_canary_then_promote(readme: str) -> None:
    files = re.findall(r"cat > plugins/routes.toml <<'EOF'\n(.*?)\nEOF\n", readme, re.DOTALL)
    assert len(files) == 2, "the runbook writes routes.toml twice: canary, then 100 %"
    canary, promoted = (parse_routes(text) for text in files)
    assert [(t.settings["model"], t.weight) for t in canary["default"].targets] == [("model-a", 90), ("model-b", 10)]
    assert [(t.settings["model"], t.weight) for t in promoted["default"].targets] == [("model-b", 100)]
    for routes in (canary, promoted):
        assert "knowledge-base" in routes


def test_runbook_names_exist_in_the_rendered_prod_overlay(readme: str, rendered: dict[str, list[Any]]) -> None:
    prod = rendered["prod"]
    deployments = {o["metadata"]["name"]: o for o in prod if o["kind"] == "Deployment"}
    for name in re.findall(r"(?:deployment/|deploy/)([a-z-]+)", readme):
        assert name in deployments, name
    pod_labels = [o["spec"]["template"]["metadata"]["labels"] for o in deployments.values()]
    for key, value in re.findall(r"-l ([a-z./]+)=([a-z-]+)", readme):
        assert any(labels.get(key) == value for labels in pod_labels), f"-l {key}={value} selects no pod"
    for name, container in re.findall(r"set image deployment/([a-z-]+) ([a-z-]+)=", readme):
        assert container in [c["name"] for c in deployments[name]["spec"]["template"]["spec"]["containers"]]
    configmaps = {o["metadata"]["name"] for o in prod if o["kind"] == "ConfigMap"}
    for name in re.findall(r"configmap ([a-z-]+)", readme):
        assert name in configmaps, name
    assert "http://127.0.0.1:9103/metrics" in readme  # the worker's metrics port in worker_metrics()
