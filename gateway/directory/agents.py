"""Agent accounts for the console login, in the `kefu_agents` bucket (key `<tenant>.<username>`).

Passwords are stored as argon2id hashes (PASSWORD_HASHER); hashing runs in a thread so a login never
stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, replace
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from gateway.directory.buckets import AGENTS, Buckets, decode, encode, nats_errors
from gateway.errors import ApiError

log = logging.getLogger(__name__)

PASSWORD_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16,
                                 type=Type.ID)
"""OWASP's argon2id minimum (m=19 MiB, t=2, p=1): with KEFU_LOGIN_MAX_CONCURRENT (2) verifications at
once a login flood adds ~40 MiB to an edge whose pod may use 256 MiB. argon2-cffi's default (64 MiB,
p=4) let ten parallel logins grow the edge by 386 MiB (issue 17). Hashes made with other
parameters still verify (they are read from the hash) and are rehashed with these on the next login."""

AGENT_ROLES = ("agent", "admin")
USERNAME_PATTERN = re.compile(r"^(?!v_)[a-z0-9_-]+(?:\.[a-z0-9_-]+)*$")
"""Lower-case letters, digits, '_', '-', inner dots (one KV key token each); never "v_..." (visitor ids)."""
MAX_USERNAME_CHARS = 64
MAX_NAME_CHARS = 80
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024


class AccountExists(ApiError):
    status = 409

    def __init__(self, username: str) -> None:
        super().__init__("account_exists", f"an account {username!r} exists already")


class NoSuchAccount(ApiError):
    status = 404

    def __init__(self, username: str) -> None:
        super().__init__("not_found", f"no account {username!r}")


def check_username(username: str) -> str:
    """The stored form (lower case); ValueError names what is wrong."""
    folded = username.strip().lower()
    if not 0 < len(folded) <= MAX_USERNAME_CHARS or not USERNAME_PATTERN.fullmatch(folded):
        raise ValueError(f"username must be 1-{MAX_USERNAME_CHARS} letters, digits, '_', '-' or inner dots, "
                         "and must not start with 'v_'")
    return folded


def check_password(password: str) -> str:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise ValueError(f"password must be {MIN_PASSWORD_CHARS}-{MAX_PASSWORD_CHARS} characters")
    return password


@dataclass(frozen=True, slots=True)
class AgentAccount:
    username: str
    display_name: str
    password_hash: str
    disabled: bool
    role: str
    """"agent" or "admin"."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> AgentAccount | None:
        username, password_hash, role = data.get("username"), data.get("password_hash"), data.get("role", "agent")
        display_name = data.get("display_name") or username
        if not (isinstance(username, str) and isinstance(password_hash, str) and isinstance(display_name, str)
                and isinstance(role, str) and role in AGENT_ROLES):
            return None
        return cls(username=username, display_name=display_name, password_hash=password_hash,
                   disabled=data.get("disabled") is not False, role=role)


class AgentAccounts:
    def __init__(self, buckets: Buckets, hasher: PasswordHasher = PASSWORD_HASHER) -> None:
        self._buckets = buckets
        self._hasher = hasher
        self._dummy_hash = ""
        """Verified against when the user does not exist, so that costs the same as a wrong password."""

    async def get(self, tenant: str, username: str) -> AgentAccount | None:
        found = await self._get(tenant, username)
        return found[0] if found is not None else None

    async def list(self, tenant: str) -> list[AgentAccount]:
        accounts = []
        for entry in await self._buckets.scan(AGENTS, f"{tenant}.>"):
            data = decode(entry.value, f"{AGENTS}/{entry.key}")
            account = AgentAccount.from_json(data) if data is not None else None
            if account is not None:
                accounts.append(account)
        return sorted(accounts, key=lambda a: a.username)

    async def add(self, tenant: str, username: str, password: str, *, display_name: str = "",
                  role: str = "agent") -> AgentAccount:
        username = check_username(username)
        if role not in AGENT_ROLES:
            raise ValueError(f"role must be one of {AGENT_ROLES}")
        password_hash = await asyncio.to_thread(self._hasher.hash, check_password(password))
        account = AgentAccount(username, display_name.strip()[:MAX_NAME_CHARS] or username, password_hash,
                               False, role)
        kv = await self._buckets.open(AGENTS)
        async with nats_errors():
            try:
                await kv.create(f"{tenant}.{username}", encode(account.to_json()))
            except KeyWrongLastSequenceError:
                raise AccountExists(username) from None
        return account

    async def set_disabled(self, tenant: str, username: str, disabled: bool) -> AgentAccount:
        return await self._update(tenant, username, disabled=disabled)

    async def reset_password(self, tenant: str, username: str, password: str) -> AgentAccount:
        password_hash = await asyncio.to_thread(self._hasher.hash, check_password(password))
        return await self._update(tenant, username, password_hash=password_hash)

    async def authenticate(self, tenant: str, username: str, password: str, *,
                           executor: Executor | None = None) -> AgentAccount | None:
        """The account when the password is right and it is enabled, else None; every failure costs one
        argon2 verification with PASSWORD_HASHER's parameters, so response times do not tell an unknown
        user from a wrong password. The hashing runs on `executor` (the edge's bounded argon2 pool)."""
        loop = asyncio.get_running_loop()
        try:
            username = check_username(username)
            found = await self._get(tenant, username)
        except ValueError:
            found = None
        account = found[0] if found is not None else None
        if account is not None:
            stored = account.password_hash
        else:
            if not self._dummy_hash:
                self._dummy_hash = await loop.run_in_executor(
                    executor, self._hasher.hash, "no such account: this hash is never matched")
            stored = self._dummy_hash
        try:
            await loop.run_in_executor(executor, self._hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if account is None or account.disabled:
            return None
        if found is not None and self._hasher.check_needs_rehash(stored):
            await self._rehash(tenant, found, password, executor)
        return account

    async def _rehash(self, tenant: str, found: tuple[AgentAccount, int], password: str,
                      executor: Executor | None) -> None:
        """Store the password again with today's parameters, unless the account changed since it was read
        (a reset password stays); a login never fails because this did."""
        account, revision = found
        new_hash = await asyncio.get_running_loop().run_in_executor(executor, self._hasher.hash, password)
        try:
            kv = await self._buckets.open(AGENTS)
            async with nats_errors():
                await kv.update(f"{tenant}.{account.username}",
                                encode(replace(account, password_hash=new_hash).to_json()), last=revision)
        except KeyWrongLastSequenceError:
            pass  # changed meanwhile: the next login looks again
        except ApiError as error:
            log.warning("could not upgrade an account's password hash in %s: %s", tenant, error.code)

    async def _get(self, tenant: str, username: str) -> tuple[AgentAccount, int] | None:
        kv = await self._buckets.open(AGENTS)
        async with nats_errors():
            try:
                entry = await kv.get(f"{tenant}.{check_username(username)}")
            except KeyNotFoundError:
                return None
        data = decode(entry.value, f"{AGENTS}/{entry.key}")
        account = AgentAccount.from_json(data) if data is not None else None
        return (account, entry.revision or 0) if account is not None else None

    async def _update(self, tenant: str, username: str, **changes: Any) -> AgentAccount:
        kv = await self._buckets.open(AGENTS)
        for _ in range(5):  # compare-and-set: a concurrent change is re-read, never overwritten
            found = await self._get(tenant, username)
            if found is None:
                raise NoSuchAccount(username)
            account = replace(found[0], **changes)
            async with nats_errors():
                try:
                    await kv.update(f"{tenant}.{account.username}", encode(account.to_json()), last=found[1])
                except KeyWrongLastSequenceError:
                    continue
            return account
        raise ApiError("conflict", "the account kept changing; try again", 409)
