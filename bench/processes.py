"""Starting one kefu service as a real process for a benchmark, and reading its memory."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.devstack.stack import REPO_ROOT, free_port

log = logging.getLogger(__name__)

INTERNAL_TOKEN = secrets.token_urlsafe(32)
"""KEFU_INTERNAL_TOKEN of the services a benchmark starts; its clients send it (services.common.grpc_client)."""
METRICS_PORT_ENV = {"session": "KEFU_SESSION_METRICS_PORT", "moderation": "KEFU_MODERATION_METRICS_PORT",
                    "llm_worker": "KEFU_WORKER_METRICS_PORT"}
GRPC_PORT_ENV = {"session": "KEFU_SESSION_PORT", "moderation": "KEFU_MODERATION_PORT", "llm_worker": "KEFU_WORKER_PORT"}


def start_service(name: str, env: Mapping[str, str], log_path: Path,
                  timeout_s: float = 60.0) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m services.<name>` on free ports with `env` added; returns once it reports SERVING."""
    port = free_port()
    child_env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
    child_env.update({GRPC_PORT_ENV[name]: str(port), METRICS_PORT_ENV[name]: str(free_port()),
                      "KEFU_BIND_HOST": "127.0.0.1", "KEFU_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
                      "KEFU_INTERNAL_TOKEN": INTERNAL_TOKEN, **env})
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=REPO_ROOT, env=child_env,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log_path}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process, port
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"{name} did not report SERVING")
            time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


@dataclass
class WorkDir:
    path: Path
    keep: bool
    """Keep the folder (data and logs) after the run; set it when something went wrong."""


@contextmanager
def bench_work_dir(prefix: str, keep: bool = False) -> Iterator[WorkDir]:
    """A temporary folder for a benchmark's stacks, removed afterwards unless kept (always on an error)."""
    work = WorkDir(Path(tempfile.mkdtemp(prefix=prefix)), keep)
    try:
        yield work
    except BaseException:
        work.keep = True
        raise
    finally:
        if work.keep:
            log.info("data and logs kept in %s", work.path)
        else:
            shutil.rmtree(work.path, ignore_errors=True)
