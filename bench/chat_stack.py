"""The fake upstream and the kefu stack a chat bench runs against, each started as real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.chat_params import MODEL, BenchParams
from bench.processes import read_line, stop_process
from devtools.devstack.stack import REPO_ROOT, Stack, StackConfig, StackPorts, free_port


def start_upstream(params: BenchParams, log_path: Path, timeout_s: float = 20.0,
                   ) -> tuple[subprocess.Popen[bytes], str]:
    """Start the fake upstream as its own process, off the load generator's loop; return it and its URL."""
    argv = [sys.executable, "-m", "devtools.fake_upstream", "--port", "0", "--ttft-ms", str(params.ttft_ms),
            "--chunks", str(params.chunks), "--interval-ms", str(params.interval_ms),
            "--reply", params.reply, "--model", MODEL]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log_file,
                                   start_new_session=True)
    try:
        line = read_line(process, timeout_s, "the fake upstream")
    except BaseException:
        stop_process(process)
        raise
    return process, line.split()[-1]  # "fake upstream listening on <base_url>"


def start_stack(data_dir: Path, upstream_url: str, secret: str, extra_env: Mapping[str, str] | None = None) -> Stack:
    # A private copy of plugins/: the worker hot-reloads on any change there, and edits to the
    # checkout during a run would otherwise reload it mid-measurement.
    plugins = shutil.copytree(REPO_ROOT / "plugins", data_dir / "plugins",
                              ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        "KEFU_PLUGINS_DIR": str(plugins),
        "KEFU_OPENAI_BASE_URL": upstream_url,
        "KEFU_MODEL": MODEL,
        # Rate limits high enough never to refuse: the bench measures the turn, not the limiter.
        "KEFU_RATE_LIMIT_RPS": "100000",
        "KEFU_RATE_LIMIT_BURST": "100000",
        "KEFU_TENANT_RATE_LIMIT_RPS": "100000",
        "KEFU_VISITOR_MSG_RPS": "1000", "KEFU_VISITOR_MSG_BURST": "100000",
        # A bench's crowd comes from one or a few addresses (bench.security_bench turns the guard back on).
        "KEFU_CONN_GUARD": "false",
        # Every bench request opens a new conversation; the default 5 per visitor refused most of them.
        "KEFU_VISITOR_MAX_CONVERSATIONS": "1000",
        "KEFU_SHUTDOWN_GRACE_S": "2",
        "KEFU_EDGE_METRICS_PORT": str(free_port()),  # edge_metrics_url() reads it back
        **(extra_env or {}),
    }
    stack = Stack(StackConfig(data_dir=data_dir, jwt_secret=secret, ports=StackPorts.free(), env=env,
                              log_dir=data_dir / "logs"))
    stack.start()
    return stack


def edge_metrics_url(stack: Stack) -> str:
    """/metrics of the stack's (first) edge process: its own port, not the public one."""
    return f"http://127.0.0.1:{stack.config.env['KEFU_EDGE_METRICS_PORT']}/metrics"


def fetch_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)
