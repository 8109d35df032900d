"""`make run`'s supervisor: starts everything, prints a working curl, Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import jwt
import pytest

from bench.sse_reader import read_sse
from devtools.devstack.stack import REPO_ROOT, StackPorts, listens_on


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Field 4 (after the parenthesised command name) is the parent pid.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def argv_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def environ_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_text().split("\0")[:-1]
    return dict(pair.split("=", 1) for pair in pairs)


@pytest.mark.parametrize("workers", [1, 2])
async def test_devstack_prints_working_curl_and_ctrl_c_stops_everything(tmp_path: Path, workers: int) -> None:
    ports = StackPorts.free()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
    env.update({"KEFU_DATA_DIR": str(tmp_path), "KEFU_HTTP_PORT": str(ports.http),
                "KEFU_SESSION_PORT": str(ports.session), "KEFU_MODERATION_PORT": str(ports.moderation),
                "KEFU_WORKER_PORT": str(ports.worker), "KEFU_NATS_PORT": str(ports.nats),
                "KEFU_SESSION_METRICS_PORT": str(ports.session_metrics),
                "KEFU_MODERATION_METRICS_PORT": str(ports.moderation_metrics),
                "KEFU_WORKER_METRICS_PORT": str(ports.worker_metrics)})
    if workers > 1:
        env["KEFU_GATEWAY_WORKERS"] = str(workers)
    supervisor = subprocess.Popen([sys.executable, "-m", "devtools.devstack"], cwd=REPO_ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
    children: list[int] = []
    try:
        assert supervisor.stdout is not None
        output = []
        for line in supervisor.stdout:
            output.append(line)
            if line.strip().startswith("curl "):
                break
        curl = shlex.split(output[-1].strip())
        assert curl[:3] == ["curl", "-N", f"http://127.0.0.1:{ports.http}/v1/chat"], "".join(output)
        headers = dict(h.split(": ", 1) for h in (curl[i + 1] for i, a in enumerate(curl) if a == "-H"))
        body = curl[curl.index("-d") + 1]
        banner = "".join(output)
        base = f"http://127.0.0.1:{ports.http}"
        assert f"  {base}/\n" in banner  # the demo shop
        console = next(line.strip() for line in output if line.strip().startswith(f"{base}/console/#token="))
        secret = (tmp_path / "dev_jwt_secret").read_text().strip()
        claims = jwt.decode(console.split("#token=", 1)[1], secret, algorithms=["HS256"])
        assert (claims["tenant"], claims["sub"], claims["role"]) == ("demo", "dev-agent", "agent")
        assert claims["exp"] - claims["iat"] == 24 * 3600
        children = children_of(supervisor.pid)
        # nats-server, three services, the edge workers: no wrappers between
        assert len(children) == 4 + workers
        edges = [pid for pid in children if argv_of(pid)[1:] == ["-m", "gateway"]]
        assert len(edges) == workers and all(listens_on(pid, ports.http) for pid in edges)
        assert {environ_of(pid)["KEFU_WIDGET_TENANTS"] for pid in edges} == {"demo"}
        async with aiohttp.ClientSession() as http:
            async with http.post(curl[2], data=body.encode(), headers=headers) as response:
                names = [event.event async for event in read_sse(response)]
            for page in (f"{base}/", console.split("#", 1)[0]):  # the shop and the console the banner names
                async with http.get(page) as response:
                    assert response.status == 200 and response.content_type == "text/html", page
        assert names[0] == "session" and names[-1] == "done" and "message" in names

        os.killpg(supervisor.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        supervisor.wait(timeout=10)
        deadline = time.monotonic() + 2
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in children if alive(pid)] == []
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if supervisor.stdout is not None:
            supervisor.stdout.close()
        supervisor.wait()
