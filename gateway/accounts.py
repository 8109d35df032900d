"""`python -m gateway.accounts`: manage the agent accounts of the console login (NATS KV `kefu_agents`).

    python -m gateway.accounts add --tenant demo --username alice [--name "Alice"] [--role agent|admin]
    python -m gateway.accounts list --tenant demo
    python -m gateway.accounts disable|enable --tenant demo --username alice
    python -m gateway.accounts reset-password --tenant demo --username alice

`add` and `reset-password` ask for the password twice (or read one line from stdin with
`--password-stdin`). The NATS server is KEFU_NATS_URL (default: the local one `make run` starts), as
KEFU_NATS_USER / KEFU_NATS_PASSWORD when it requires users (make run: `admin` or `edge` in data/nats/users.json).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from gateway.directory.agents import AGENT_ROLES, MAX_NAME_CHARS, AgentAccount, AgentAccounts, check_password
from gateway.directory.buckets import TENANT_PATTERN, Buckets
from gateway.errors import ApiError
from services.common.errors import KefuError
from services.common.nats_client import NatsEndpoint
from services.common.settings import KefuSettings, nats_url


class CliError(KefuError):
    """Printed as one line; exit status 1."""


def tenant_name(text: str) -> str:
    if not TENANT_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError("a tenant is 1-64 letters, digits, '_' or '-'")
    return text


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m gateway.accounts", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    for name, text in (("add", "create an account"), ("list", "list a tenant's accounts"),
                       ("disable", "refuse the account's logins"), ("enable", "allow the account's logins again"),
                       ("reset-password", "set a new password")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--tenant", required=True, type=tenant_name)
        if name != "list":
            command.add_argument("--username", required=True)
        if name == "add":
            command.add_argument("--name", default="", help=f"display name shown to visitors (<= {MAX_NAME_CHARS})")
            command.add_argument("--role", default="agent", choices=AGENT_ROLES)
        if name in ("add", "reset-password"):
            command.add_argument("--password-stdin", action="store_true",
                                 help="read the password from the first line of stdin instead of a prompt")
    return top


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise CliError("the passwords differ")
    try:
        return check_password(password)
    except ValueError as error:
        raise CliError(str(error)) from None


def describe(account: AgentAccount) -> str:
    state = "disabled" if account.disabled else "enabled"
    return f"{account.username}\t{account.role}\t{state}\t{account.display_name}"


async def _ignore(error: Exception) -> None:
    """nats-py's default error callback logs a traceback on every failed connect; the exit line says it once."""


async def run(args: argparse.Namespace, url: str) -> list[str]:
    password = read_password(args.password_stdin) if args.command in ("add", "reset-password") else ""
    # KEFU_NATS_USER / KEFU_NATS_PASSWORD (the edge's user, or admin) ride in `url`: never print it whole.
    endpoint = NatsEndpoint.parse(url)
    try:
        nc = await nats.connect(list(endpoint.servers), name="kefu-accounts", connect_timeout=2,
                                max_reconnect_attempts=2, reconnect_time_wait=0.5, error_cb=_ignore,
                                user=endpoint.user or None, password=endpoint.password or None,
                                inbox_prefix=endpoint.inbox_prefix)
    except (OSError, TimeoutError, nats.errors.Error) as error:
        raise CliError(f"cannot reach NATS at {endpoint.redacted()}: {error or type(error).__name__}") from None
    try:
        async def connection() -> NatsClient:
            return nc

        accounts = AgentAccounts(Buckets(connection))
        if args.command == "list":
            return [describe(account) for account in await accounts.list(args.tenant)]
        if args.command == "add":
            account = await accounts.add(args.tenant, args.username, password, display_name=args.name,
                                         role=args.role)
            return [f"added {describe(account)}"]
        if args.command == "reset-password":
            account = await accounts.reset_password(args.tenant, args.username, password)
            return [f"new password for {account.username}"]
        account = await accounts.set_disabled(args.tenant, args.username, args.command == "disable")
        return [f"{args.command}d {describe(account)}"]
    except (ApiError, ValueError) as error:
        raise CliError(str(error)) from None
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        lines = asyncio.run(run(args, nats_url(KefuSettings.environment())))  # environment over ./.env
    except CliError as error:
        sys.exit(f"accounts: {error}")
    except KeyboardInterrupt:
        sys.exit(130)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
