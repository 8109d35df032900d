"""Starting and stopping the whole system as real processes (make run, end-to-end tests, bench)."""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.devstack.nats_auth import PROCESS_ROLES, NatsUsers
from devtools.devstack.nats_server import NatsServer, start_nats_server
from services.common.errors import KefuError
from services.common.nats_client import NatsEndpoint
from services.common.settings import with_credentials

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("session", "moderation", "llm_worker")
EDGE = "gateway"
"""Process name of the first edge; the other workers are gateway-2, gateway-3, ..."""


# Below Linux's ephemeral range (32768-60999 by default): a port the kernel hands out for port 0
# may also be taken meanwhile by any outgoing connection, before the process meant to listen binds.
_FREE_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A port nothing listens on now, for a process that will bind it shortly (tests, benchmarks)."""
    for _ in range(200):
        port = random.randrange(*_FREE_PORT_RANGE)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


@dataclass(frozen=True)
class StackPorts:
    http: int = 8080
    session: int = 50051
    moderation: int = 50052
    worker: int = 50053
    session_metrics: int = 9101
    moderation_metrics: int = 9102
    worker_metrics: int = 9103
    nats: int = 4222

    @classmethod
    def free(cls) -> StackPorts:
        ports: list[int] = []
        while len(ports) < 8:
            if (port := free_port()) not in ports:
                ports.append(port)
        return cls(*ports)


@dataclass
class StackConfig:
    data_dir: Path
    jwt_secret: str = field(repr=False)
    ports: StackPorts = field(default_factory=StackPorts)
    nats_url: str = ""
    """An existing NATS (its credentials, if any, in env); empty starts a local nats-server on ports.nats,
    with a user per process role (devtools.devstack.nats_auth)."""
    internal_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    """KEFU_INTERNAL_TOKEN of every process: what internal gRPC callers send (tests: stack.config.internal_token)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra KEFU_* settings for every process (e.g. KEFU_OPENAI_BASE_URL)."""
    log_dir: Path | None = None
    """Where each process writes its log; None inherits the caller's stderr."""
    gateway_workers: int = 1
    """KEFU_GATEWAY_WORKERS: edge processes sharing ports.http through SO_REUSEPORT."""

    def __post_init__(self) -> None:
        if not 1 <= self.gateway_workers <= 64:
            raise ValueError(f"KEFU_GATEWAY_WORKERS must be 1..64, got {self.gateway_workers}")

    @property
    def edge_names(self) -> tuple[str, ...]:
        return (EDGE, *(f"{EDGE}-{n}" for n in range(2, self.gateway_workers + 1)))


class ProcessFailed(KefuError, RuntimeError):
    """A process of the stack exited while it started; carries the end of what it wrote."""

    def __init__(self, name: str, code: int, log_tail: str) -> None:
        wrote = f"; it wrote:\n{log_tail}" if log_tail else ""
        super().__init__(f"{name} exited with code {code} during start-up{wrote}")
        self.name = name
        self.exit_code = code
        self.log_tail = log_tail


class Stack:
    """nats-server, the three services and the edge, each its own process group."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.nats: NatsServer | None = None
        self.nats_users: NatsUsers | None = None
        """The local nats-server's users, when the stack started one."""
        self._log_offsets: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._argv: dict[str, list[str]] = {}
        self._env_overrides: dict[str, dict[str, str]] = {}
        """Per-process settings on top of environment() (an extra edge on its own port)."""
        self._http_ports: dict[str, int] = {name: config.ports.http for name in config.edge_names}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.http}"

    @property
    def nats_address(self) -> str:
        """The NATS server(s), without credentials: fit for printing."""
        if self.config.nats_url:
            return ",".join(NatsEndpoint.parse(self.config.nats_url).servers)
        return self.nats.url if self.nats else ""

    @property
    def nats_url(self) -> str:
        """NATS for tests and tools, as the `admin` user when the stack runs its own server.

        A secret (it carries the password): print nats_address instead."""
        if self.config.nats_url or self.nats_users is None:
            return self.config.nats_url or self.nats_address
        return with_credentials(self.nats_address, "admin", self.nats_users.passwords["admin"])

    def nats_url_as(self, user: str) -> str:
        """The local NATS as one process role's user (edge, session, llm_worker): to test its permissions."""
        assert self.nats_users is not None, "the stack runs no nats-server of its own"
        return with_credentials(self.nats_address, user, self.nats_users.passwords[user])

    def _nats_credentials(self, name: str) -> dict[str, str]:
        """KEFU_NATS_USER / KEFU_NATS_PASSWORD of one process, when the stack's own nats-server has users."""
        user = "edge" if name in self._http_ports else PROCESS_ROLES.get(name)
        if self.nats_users is None or user is None:
            return {}
        return {"KEFU_NATS_USER": user, "KEFU_NATS_PASSWORD": self.nats_users.passwords[user]}

    def environment(self) -> dict[str, str]:
        ports = self.config.ports
        env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "KEFU_NATS_URL": self.config.nats_url or self.nats_address,
            "KEFU_JWT_SECRET": self.config.jwt_secret,
            "KEFU_INTERNAL_TOKEN": self.config.internal_token,
            "KEFU_HTTP_PORT": str(ports.http),
            "KEFU_SESSION_PORT": str(ports.session),
            "KEFU_MODERATION_PORT": str(ports.moderation),
            "KEFU_WORKER_PORT": str(ports.worker),
            "KEFU_SESSION_METRICS_PORT": str(ports.session_metrics),
            "KEFU_MODERATION_METRICS_PORT": str(ports.moderation_metrics),
            "KEFU_WORKER_METRICS_PORT": str(ports.worker_metrics),
            "KEFU_SESSION_ADDR": f"127.0.0.1:{ports.session}",
            "KEFU_MODERATION_ADDR": f"127.0.0.1:{ports.moderation}",
            "KEFU_WORKER_ADDR": f"127.0.0.1:{ports.worker}",
        })
        env.update(self.config.env)
        # The stack's own count wins over a stray value in env: every worker must agree to share.
        env["KEFU_GATEWAY_WORKERS"] = str(self.config.gateway_workers)
        # The stack passes every setting: the processes read no .env (make run read it once; tests want none).
        env["KEFU_ENV_FILE"] = ""
        return env

    @property
    def edges(self) -> dict[str, int]:
        """Edge process name -> its HTTP port (the workers share ports.http; extra edges have their own)."""
        return dict(self._http_ports)

    def start(self, timeout_s: float = 60.0) -> None:
        try:
            if not self.config.nats_url:
                store = self.config.data_dir / "nats"
                self.nats_users = NatsUsers.load_or_create(store / "users.json")
                self.nats = start_nats_server(store, port=self.config.ports.nats,
                                              config_file=self.nats_users.write_server_config(store / "nats.conf"))
            ports = self.config.ports
            for name in SERVICES:
                self.start_process(name)
            deadline = time.monotonic() + timeout_s
            for name, port in (("session", ports.session), ("moderation", ports.moderation),
                               ("llm_worker", ports.worker)):
                self.wait_grpc_serving(name, port, deadline)
            for name in self.config.edge_names:
                self.start_process(name)
            for name in self.config.edge_names:
                self.wait_edge_ready(name, deadline)
        except BaseException:
            self.stop()
            raise

    def start_edge(self, name: str, http_port: int, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
        """One more edge process on a port of its own (benchmarks: visitor and agent on different edges)."""
        if name in self._http_ports:
            raise ValueError(f"an edge named {name} exists already")
        self._http_ports[name] = http_port
        self._env_overrides[name] = {"KEFU_HTTP_PORT": str(http_port), "KEFU_GATEWAY_WORKERS": "1"}
        process = self.start_process(name)
        self.wait_edge_ready(name, time.monotonic() + timeout_s)
        return process

    def start_process(self, name: str) -> subprocess.Popen[bytes]:
        """Start (or start again, with the same argv and env) `python -m <module>`."""
        module = "gateway" if name in self._http_ports else f"services.{name}"
        argv = self._argv.setdefault(name, [sys.executable, "-m", module])
        log_file = None
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(self.config.log_dir / f"{name}.log", "ab")
            self._log_offsets[name] = log_file.tell()
        try:
            process = subprocess.Popen(
                argv, cwd=REPO_ROOT,
                env={**self.environment(), **self._nats_credentials(name), **self._env_overrides.get(name, {})},
                stdout=log_file,
                stderr=subprocess.STDOUT if log_file else None, start_new_session=True)
        finally:
            if log_file is not None:
                log_file.close()  # the child holds its own descriptor
        self.processes[name] = process
        return process

    def wait_grpc_serving(self, name: str, port: int, deadline: float) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(name)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not report SERVING on port {port}")
                time.sleep(0.05)

    def wait_edge_ready(self, name: str, deadline: float) -> None:
        """The edge process listens on its port, and its port answers /readyz with ready."""
        port = self._http_ports[name]
        while True:
            self._check_alive(name)
            if listens_on(self.processes[name].pid, port):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not listen on port {port}")
            time.sleep(0.05)
        self.wait_http_ready(deadline, name)

    def wait_http_ready(self, deadline: float, name: str = EDGE) -> None:
        url = f"http://127.0.0.1:{self._http_ports[name]}/readyz"
        while True:
            self._check_alive(name)
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if json.load(reply).get("status") == "ready":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the edge did not become ready")
            time.sleep(0.05)

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            raise ProcessFailed(name, process.returncode, self.log_tail(name))

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines `name` wrote to its log since it was last started ("" without a log dir)."""
        if self.config.log_dir is None:
            return ""
        try:
            with open(self.config.log_dir / f"{name}.log", "rb") as log_file:
                log_file.seek(self._log_offsets.get(name, 0))
                text = log_file.read()[-64 * 1024:].decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def kill(self, name: str) -> None:
        """SIGKILL one process (crash tests)."""
        process = self.processes[name]
        process.kill()
        process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM everything, edge first, then wait; SIGKILL what is left at the deadline."""
        order = [*(n for n in self.processes if n in self._http_ports),
                 *(n for n in ("llm_worker", "moderation", "session") if n in self.processes)]
        for name in order:
            _signal(self.processes[name], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name in order:
            process = self.processes[name]
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                process.kill()
                process.wait()
        if self.nats is not None:
            self.nats.stop()


# ---------------------------------------------------------------- who holds a TCP port (Linux /proc)

TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"


def tcp_socket_inodes(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets whose local port is `port`, in `state` (hex, as /proc/net/tcp shows it)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(int(fields[9]))
    return inodes


def socket_inodes_of(pid: int) -> set[int]:
    """Inodes of the sockets a process holds open (its /proc/<pid>/fd links `socket:[inode]`)."""
    inodes: set[int] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def sockets_by_pid(pids: list[int], port: int, state: str) -> dict[int, int]:
    """How many TCP sockets on local `port` in `state` each process holds."""
    wanted = tcp_socket_inodes(port, state)
    return {pid: len(socket_inodes_of(pid) & wanted) for pid in pids}


def listens_on(pid: int, port: int) -> bool:
    return bool(socket_inodes_of(pid) & tcp_socket_inodes(port, TCP_LISTEN))


def listening_pids(port: int) -> set[int]:
    """Processes of this machine holding a listening socket on `port` (those /proc lets us see)."""
    wanted = tcp_socket_inodes(port, TCP_LISTEN)
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and socket_inodes_of(int(entry.name)) & wanted:
            found.add(int(entry.name))
    return found


def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is None:
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass
