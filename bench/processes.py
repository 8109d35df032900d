"""Child processes of a benchmark: one kefu service started for real, stopped, read from; its work folder."""

from __future__ import annotations

import logging
import os
import secrets
import select
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
    wait_serving(process, port, name, log_path, timeout_s)
    return process, port


def wait_serving(process: subprocess.Popen[bytes], port: int, name: str, log_path: Path,
                 timeout_s: float | None = None) -> None:
    """Poll the gRPC health service on `port` until it reports SERVING; the process must not exit meanwhile,
    and with `timeout_s` it is killed when that passes first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log_path}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"{name} did not report SERVING")
            time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; closes its stdout pipe if it has one."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def read_line(process: subprocess.Popen[bytes], timeout_s: float, what: str) -> str:
    """The next line a child prints on its stdout pipe; it must come within `timeout_s`."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")
    line = process.stdout.readline().decode()
    if not line:
        raise RuntimeError(f"{what}: the process exited with code {process.wait()}")
    return line


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
