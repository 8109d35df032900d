"""`python -m gateway.accounts` as a subprocess against a real nats-server, then the console login it enables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.devstack.nats_server import NatsServer
from devtools.devstack.stack import free_port
from tests.gateway.live_http_support import ClientFactory, EdgeClient, edge_settings, start_edge

REPO = Path(__file__).resolve().parents[2]


def accounts_cli(nats_url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
    env["KEFU_NATS_URL"] = nats_url
    return subprocess.run([sys.executable, "-m", "gateway.accounts", *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=60, check=False)


@pytest.fixture
async def client(nats_server: NatsServer, aiohttp_client: ClientFactory) -> EdgeClient:
    return await start_edge(aiohttp_client, edge_settings(nats_server.url))


async def login_status(client: EdgeClient, username: str, password: str, tenant: str = "shop1") -> int:
    response = await client.post("/v1/console/login", json={"tenant": tenant, "username": username,
                                                            "password": password})
    return response.status


async def test_accounts_cli_add_list_disable_enable_reset(nats_server: NatsServer, client: EdgeClient) -> None:
    url = nats_server.url
    added = accounts_cli(url, "add", "--tenant", "shop1", "--username", "alice", "--name", "Alice 王",
                         "--password-stdin", stdin="first password\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "added alice\tagent\tenabled\tAlice 王"
    admin = accounts_cli(url, "add", "--tenant", "shop1", "--username", "boss", "--role", "admin",
                         "--password-stdin", stdin="boss password\n")
    assert admin.returncode == 0, admin.stderr
    assert accounts_cli(url, "add", "--tenant", "shop2", "--username", "zed", "--password-stdin",
                        stdin="zed's password\n").returncode == 0
    listed = accounts_cli(url, "list", "--tenant", "shop1")
    assert listed.stdout.splitlines() == ["alice\tagent\tenabled\tAlice 王", "boss\tadmin\tenabled\tboss"]
    assert await login_status(client, "alice", "first password") == 200

    assert accounts_cli(url, "disable", "--tenant", "shop1", "--username", "alice").returncode == 0
    assert "alice\tagent\tdisabled" in accounts_cli(url, "list", "--tenant", "shop1").stdout
    assert await login_status(client, "alice", "first password") == 401
    assert accounts_cli(url, "enable", "--tenant", "shop1", "--username", "alice").returncode == 0
    assert await login_status(client, "alice", "first password") == 200

    reset = accounts_cli(url, "reset-password", "--tenant", "shop1", "--username", "alice", "--password-stdin",
                         stdin="second password\n")
    assert reset.returncode == 0 and reset.stdout.strip() == "new password for alice"
    assert await login_status(client, "alice", "first password") == 401
    assert await login_status(client, "alice", "second password") == 200
    assert await login_status(client, "zed", "zed's password", tenant="shop2") == 200
    assert await login_status(client, "zed", "zed's password") == 401


def test_accounts_cli_refusals(nats_server: NatsServer) -> None:
    url = nats_server.url
    assert accounts_cli(url, "add", "--tenant", "shop1", "--username", "alice", "--password-stdin",
                        stdin="a password\n").returncode == 0
    again = accounts_cli(url, "add", "--tenant", "shop1", "--username", "ALICE", "--password-stdin",
                         stdin="other password\n")
    assert again.returncode == 1 and "exists already" in again.stderr
    short = accounts_cli(url, "add", "--tenant", "shop1", "--username", "bob", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "password must be" in short.stderr
    bad_name = accounts_cli(url, "add", "--tenant", "shop1", "--username", "v_visitor", "--password-stdin",
                            stdin="a password\n")
    assert bad_name.returncode == 1 and "username must be" in bad_name.stderr
    missing = accounts_cli(url, "disable", "--tenant", "shop1", "--username", "nobody")
    assert missing.returncode == 1 and "no account 'nobody'" in missing.stderr
    bad_tenant = accounts_cli(url, "list", "--tenant", "a.b")
    assert bad_tenant.returncode == 2 and "tenant" in bad_tenant.stderr
    assert accounts_cli(url, "list", "--tenant", "shop1").stdout.splitlines() == ["alice\tagent\tenabled\talice"]


def test_accounts_cli_without_nats_says_so() -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    result = accounts_cli(dead, "list", "--tenant", "shop1")
    assert result.returncode == 1 and f"cannot reach NATS at {dead}" in result.stderr
    assert "Traceback" not in result.stderr
