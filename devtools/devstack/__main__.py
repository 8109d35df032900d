"""`python -m devtools.devstack` (make run): the whole system on this machine until Ctrl-C."""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from devtools.devstack.settings import DevStackSettings
from devtools.devstack.stack import REPO_ROOT, ProcessFailed, Stack, StackConfig
from devtools.mint_token import mint
from services.common.settings import SettingsError, check_secret

log = logging.getLogger("devstack")


def kept_secret(data_dir: Path, name: str, given: str, file_name: str) -> str:
    """The secret `given` in variable `name`, else a random one kept (0600) under data/ so a restart keeps it."""
    if given:
        check_secret(name, given)
        return given
    path = data_dir / file_name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(secrets.token_urlsafe(32))
    secret = path.read_text().strip()
    check_secret(f"{name} (from {path})", secret)
    return secret


def dev_secret(data_dir: Path, settings: DevStackSettings) -> str:
    """KEFU_JWT_SECRET, else a random one kept under data/ so tokens survive a restart."""
    return kept_secret(data_dir, "KEFU_JWT_SECRET", settings.jwt_secret, "dev_jwt_secret")


def dev_internal_token(data_dir: Path, settings: DevStackSettings) -> str:
    """KEFU_INTERNAL_TOKEN, else one kept under data/ (internal gRPC tools can read it there); "" when
    KEFU_INTERNAL_AUTH=off."""
    if settings.internal_auth_off:
        return ""
    return kept_secret(data_dir, "KEFU_INTERNAL_TOKEN", settings.internal_token, "dev_internal_token")


DEMO_TENANT = "demo"
DEV_AGENT = "dev-agent"
DEV_ADMIN = "dev-admin"
DEMO_KNOWLEDGE = REPO_ROOT / "services" / "llm_worker" / "demo_knowledge"
"""`<tenant>/<files>`: the seed folder `make run` gives the worker (KEFU_KB_SEED_DIR)."""
DEV_TOKEN_TTL_S = 24 * 3600


def edge_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The KEFU_* settings passed on to every process; the demo shop's widget may get tokens for 'demo'."""
    env = {key: value for key, value in environ.items() if key.startswith("KEFU_")}
    env.setdefault("KEFU_WIDGET_TENANTS", DEMO_TENANT)
    # The demo tenant's documents (the tea shop's FAQ and policies), so answers cite sources at once.
    env.setdefault("KEFU_KB_SEED_DIR", str(DEMO_KNOWLEDGE))
    return env


def banner(stack: Stack, secret: str, log_dir: Path) -> str:
    token = mint(secret, tenant=DEMO_TENANT, subject="visitor-1", role="visitor", ttl_s=DEV_TOKEN_TTL_S)
    agent = mint(secret, tenant=DEMO_TENANT, subject=DEV_AGENT, role="agent", ttl_s=DEV_TOKEN_TTL_S)
    admin = mint(secret, tenant=DEMO_TENANT, subject=DEV_ADMIN, role="admin", ttl_s=DEV_TOKEN_TTL_S)
    body = '{"message": "下单后多久发货？"}'
    curl = (f"curl -N {stack.base_url}/v1/chat -H 'Authorization: Bearer {token}' "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")
    workers = stack.config.gateway_workers
    edges = f", {workers} edge processes sharing the port" if workers > 1 else ""
    return "\n".join([
        "", f"kefu is running at {stack.base_url}   (NATS {stack.nats_address}{edges}, logs in {log_dir})", "",
        f"Demo shop with the chat widget (tenant '{DEMO_TENANT}'):", "", f"  {stack.base_url}/", "",
        f"Agent console, logged in as '{DEV_AGENT}' (the token stays in the URL fragment, valid 24 h):", "",
        f"  {stack.base_url}/console/#token={agent}", "",
        "The console as an admin: its Knowledge page holds the tenant's documents (the tea shop's, seeded):", "",
        f"  {stack.base_url}/console/#token={admin}", "",
        f"Ask it something (a dev token for tenant '{DEMO_TENANT}', valid 24 h):", "", f"  {curl}", "",
        "Mint other tokens: KEFU_JWT_SECRET=$(cat data/dev_jwt_secret) make token ARGS='--role agent'",
        "Internal gRPC callers send 'authorization: Bearer <data/dev_internal_token>'; NATS users and their",
        "passwords (edge, session, llm_worker, admin for tools) are in data/nats/users.json.",
        "Ctrl-C stops everything.", ""])


def indented(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines()) or "  (it wrote nothing)"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="devstack: %(message)s")
    try:
        # Read once here (environment over .env) and passed on whole: the processes read no .env themselves.
        variables = DevStackSettings.environment()
        settings = DevStackSettings.load(variables)
        data_dir = settings.data_dir or REPO_ROOT / "data"
        log_dir = data_dir / "logs"
        config = StackConfig(data_dir=data_dir, jwt_secret=dev_secret(data_dir, settings), ports=settings.ports,
                             internal_token=dev_internal_token(data_dir, settings), nats_url=settings.nats_url,
                             log_dir=log_dir, env=edge_environment(variables),
                             gateway_workers=settings.gateway_workers)
    except SettingsError as error:
        sys.exit(f"devstack: {error}")
    stack = Stack(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    edges = "the edge" if config.gateway_workers == 1 else f"{config.gateway_workers} edge processes"
    log.info("starting nats-server, session, moderation, llm_worker and %s ...", edges)
    try:
        stack.start()
    except ProcessFailed as failed:
        # What the process said before it died, here on the terminal rather than only in its log.
        sys.exit(f"devstack: {failed.name} exited with code {failed.exit_code} during start-up; the end of its log:\n"
                 f"{indented(failed.log_tail)}\n(full log: {log_dir / (failed.name + '.log')})")
    except (RuntimeError, TimeoutError, OSError) as error:
        sys.exit(f"devstack: {error} (see {log_dir})")
    print(banner(stack, config.jwt_secret, log_dir), flush=True)
    reported: set[str] = set()
    while not stop.wait(0.5):
        for name, process in stack.processes.items():
            if process.poll() is not None and name not in reported:
                # One child's death does not stop the rest (restart it by hand with the same argv).
                reported.add(name)
                log.warning("%s exited with code %s; the others keep running. Its last lines (%s):\n%s",
                            name, process.returncode, log_dir / f"{name}.log", indented(stack.log_tail(name)))
            elif process.poll() is None:
                reported.discard(name)
    log.info("stopping ...")
    stack.stop()
    log.info("stopped")


if __name__ == "__main__":
    main()
