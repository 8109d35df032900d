"""Helpers for end-to-end tests: start the real system, mint tokens, wait for conditions."""

from __future__ import annotations

import secrets
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from devtools.devstack.stack import Stack, StackConfig, StackPorts, free_port
from devtools.mint_token import mint

# Fixed per run of the interpreter; imported by conftest and tests alike.
SECRET = "e2e-" + secrets.token_hex(16)
BUNDLED_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
FAQ_ROUTES = """
[routes.default]
provider = "knowledge_base"

[routes.default.settings]
faq_file = "shop_faq.json"
chunk_chars = 4
chunk_delay_s = 0.02

[routes.knowledge-base]
provider = "knowledge_base"

[routes.knowledge-base.settings]
faq_file = "shop_faq.json"
chunk_delay_s = 0
"""


def faq_plugins_env(data_dir: Path) -> dict[str, str]:
    """KEFU_PLUGINS_DIR of a copy of plugins/ whose routes name the tea shop's FAQ file, so every tenant
    without documents gets its answers: the stack the tests written before tenants had documents expect."""
    folder = data_dir / "faq-plugins"
    shutil.copytree(BUNDLED_PLUGINS, folder, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    (folder / "routes.toml").write_text(FAQ_ROUTES, encoding="utf-8")
    return {"KEFU_PLUGINS_DIR": str(folder)}

UNLIMITED_VISITORS = {"KEFU_VISITOR_MSG_RPS": "1000", "KEFU_VISITOR_MSG_BURST": "100000",
                      "KEFU_VISITOR_MAX_SOCKETS": "1000", "KEFU_VISITOR_MAX_CONVERSATIONS": "1000",
                      # Every test connects from 127.0.0.1: the connection guard stays in the path, never cuts.
                      "KEFU_CONN_RPS": "100000", "KEFU_CONN_BURST": "1000000"}
"""Functional tests send as one visitor faster than a person does; tests/security sets the real limits."""


def start_stack(data_dir: Path, env: dict[str, str] | None = None, attempts: int = 3, workers: int = 1) -> Stack:
    """The whole system on free ports with `workers` edge processes; a port taken between choosing and binding
    it means a retry."""
    for attempt in range(1, attempts + 1):
        # The edge's own metrics port (KEFU_EDGE_METRICS_PORT; the workers take it and the ones above).
        stack = Stack(StackConfig(data_dir=data_dir, jwt_secret=SECRET, ports=StackPorts.free(),
                                  env={"KEFU_SHUTDOWN_GRACE_S": "2", "KEFU_EDGE_METRICS_PORT": str(free_port()),
                                       **UNLIMITED_VISITORS, **(env or {})},
                                  log_dir=data_dir / "logs", gateway_workers=workers))
        try:
            stack.start()  # stops whatever it started when it fails
            return stack
        except (RuntimeError, TimeoutError):
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def edge_metrics_url(stack: Stack, worker: int = 0) -> str:
    """/metrics of a stack's edge; each further edge process takes the next free port (gateway/__main__.py)."""
    return f"http://127.0.0.1:{int(stack.config.env['KEFU_EDGE_METRICS_PORT']) + worker}/metrics"


def token(tenant: str = "shop1", sub: str = "visitor-1", role: str = "visitor", ttl_s: int = 600) -> str:
    return mint(SECRET, tenant=tenant, subject=sub, role=role, ttl_s=ttl_s)


def auth(tenant: str = "shop1", sub: str = "visitor-1", role: str = "visitor") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(tenant, sub, role)}"}


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout_s} s")


def metric_samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample named `name` (e.g. `..._count`) a process's /metrics shows now, with its labels."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return [(sample.labels, sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]
