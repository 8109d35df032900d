"""Issue 17 item 6: a weak or missing secret stops every process that reads it, with one line naming it, and
`make run` (python -m devtools.devstack) shows a failing process's error on the terminal and exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.devstack.stack import REPO_ROOT, StackPorts, free_port, listening_pids

SHORT = "too-short-secret-31-bytes-long!"  # 31 bytes: one under the minimum
GOOD = "a-long-enough-secret-of-40-bytes-0123456"
PROCESSES = {"gateway": "gateway", "session": "services.session", "moderation": "services.moderation",
             "llm_worker": "services.llm_worker"}


def clean_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
    # Free ports, so that a process that wrongly started would not collide with anything.
    env.update({"KEFU_HTTP_PORT": str(free_port()), "KEFU_EDGE_METRICS_PORT": str(free_port()),
                "KEFU_SESSION_PORT": str(free_port()), "KEFU_MODERATION_PORT": str(free_port()),
                "KEFU_WORKER_PORT": str(free_port()), "KEFU_SESSION_METRICS_PORT": str(free_port()),
                "KEFU_MODERATION_METRICS_PORT": str(free_port()), "KEFU_WORKER_METRICS_PORT": str(free_port()),
                "KEFU_NATS_URL": f"nats://127.0.0.1:{free_port()}", "KEFU_ENV_FILE": "", **settings})
    return env


def run(module: str, env: dict[str, str], timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def assert_refused_in_one_line(result: subprocess.CompletedProcess[str], name: str, variable: str,
                               secret: str = SHORT) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith(f"{name}: {variable}"), lines[0]
    if secret:
        assert secret not in result.stdout + result.stderr  # the secret itself is never echoed
    return lines[0]


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_a_short_internal_token_stops_every_process(name: str) -> None:
    result = run(PROCESSES[name], clean_env(KEFU_JWT_SECRET=GOOD, KEFU_INTERNAL_TOKEN=SHORT))
    line = assert_refused_in_one_line(result, name, "KEFU_INTERNAL_TOKEN")
    assert "too short: 31 bytes, at least 32" in line


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_a_missing_internal_token_stops_every_process_unless_turned_off_on_purpose(name: str) -> None:
    result = run(PROCESSES[name], clean_env(KEFU_JWT_SECRET=GOOD))
    assert "is not set" in assert_refused_in_one_line(result, name, "KEFU_INTERNAL_TOKEN", secret="")


def test_a_short_jwt_secret_stops_the_edge_and_the_token_tool() -> None:
    result = run("gateway", clean_env(KEFU_JWT_SECRET=SHORT, KEFU_INTERNAL_TOKEN=GOOD))
    assert "too short: 31 bytes" in assert_refused_in_one_line(result, "gateway", "KEFU_JWT_SECRET")
    minted = run("devtools.mint_token", clean_env(KEFU_JWT_SECRET=SHORT))
    assert_refused_in_one_line(minted, "mint_token", "KEFU_JWT_SECRET")
    # Multi-byte characters count as bytes: 11 Chinese characters are 33 bytes, enough.
    accepted = run("devtools.mint_token", clean_env(KEFU_JWT_SECRET="密" * 11))
    assert accepted.returncode == 0 and accepted.stdout.count(".") == 2, accepted.stderr


def devstack_env(data_dir: Path, ports: StackPorts, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
    env.update({"KEFU_DATA_DIR": str(data_dir), "KEFU_HTTP_PORT": str(ports.http),
                "KEFU_SESSION_PORT": str(ports.session), "KEFU_MODERATION_PORT": str(ports.moderation),
                "KEFU_WORKER_PORT": str(ports.worker), "KEFU_NATS_PORT": str(ports.nats),
                "KEFU_SESSION_METRICS_PORT": str(ports.session_metrics),
                "KEFU_MODERATION_METRICS_PORT": str(ports.moderation_metrics),
                "KEFU_WORKER_METRICS_PORT": str(ports.worker_metrics), "KEFU_EDGE_METRICS_PORT": str(free_port()),
                "KEFU_ENV_FILE": "", **settings})
    return env


def test_make_run_refuses_a_short_jwt_secret_before_starting_anything(tmp_path: Path) -> None:
    ports = StackPorts.free()
    result = run("devtools.devstack", devstack_env(tmp_path, ports, KEFU_JWT_SECRET=SHORT))
    assert result.returncode != 0
    assert "devstack: KEFU_JWT_SECRET is too short" in result.stderr, result.stderr
    assert SHORT not in result.stdout + result.stderr
    assert not listening_pids(ports.nats)


def test_make_run_prints_a_failing_processs_error_and_stops_the_rest(tmp_path: Path) -> None:
    # A setting only the session service checks: it exits at start, the others are already starting.
    ports = StackPorts.free()
    supervisor = subprocess.Popen([sys.executable, "-m", "devtools.devstack"], cwd=REPO_ROOT,
                                  env=devstack_env(tmp_path, ports, KEFU_SESSION_TTL_S="5"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
    try:
        output, _ = supervisor.communicate(timeout=90)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert supervisor.returncode != 0, output
    # On the terminal: which process, and what it said (the one line of its own), not just "see the log".
    assert "session exited with code 1 during start-up" in output, output
    assert "session: KEFU_SESSION_TTL_S must be >= 60, got 5" in output, output
    assert "kefu is running" not in output
    # Nothing it started is left behind.
    for port in (ports.nats, ports.moderation, ports.worker, ports.http):
        assert not listening_pids(port), port
