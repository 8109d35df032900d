"""Reading typed `KEFU_*` settings from the environment, failing with one clear line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Self
from urllib.parse import quote, urlsplit, urlunsplit

MIN_SECRET_BYTES = 32
"""Shared secrets (the JWT HMAC key, the internal token) shorter than this are refused at start."""


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class EventLoopSettings:
    """How every kefu process runs its event loop (services.common.entrypoint)."""

    uvloop: bool = True
    """KEFU_UVLOOP: run on uvloop, which grpc.aio, aiohttp and nats-py all support (issue 20: it cut the
    aiohttp client's CPU by about 45 % and nats-py's by 25-35 %); 0 falls back to asyncio's own loop,
    for debugging."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Self:
        return cls(uvloop=env_bool(env, "KEFU_UVLOOP", True))


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, default).strip() or default


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be <= {maximum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float | None = None,
              maximum: float | None = None) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be <= {maximum}, got {value}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def env_secret(env: Mapping[str, str], name: str) -> str:
    """A shared secret, used as given; empty when unset, refused when shorter than 32 bytes (never echoed)."""
    value = env.get(name, "")
    check_secret(name, value)
    return value


def check_secret(name: str, value: str) -> None:
    """Refuse a set secret shorter than MIN_SECRET_BYTES; the message names the variable, never the value."""
    if value and len(value.encode()) < MIN_SECRET_BYTES:
        raise SettingsError(f"{name} is too short: {len(value.encode())} bytes, at least {MIN_SECRET_BYTES} "
                            "needed (e.g. openssl rand -base64 32)")


def internal_tokens(value: str) -> tuple[str, ...]:
    """The tokens of a KEFU_INTERNAL_TOKEN value: callers send the first, services accept any of them."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def internal_token(env: Mapping[str, str]) -> str:
    """KEFU_INTERNAL_TOKEN, the bearer credential of internal gRPC calls; "" only with KEFU_INTERNAL_AUTH=off.

    Every gRPC service requires it from its callers and every caller sends it, so a process that has
    none refuses to start unless the deployment turned internal authentication off on purpose.
    A comma-separated list rotates it without downtime: callers send the first, services accept each
    (roll out "old,new", then "new,old", then "new")."""
    tokens = internal_tokens(env.get("KEFU_INTERNAL_TOKEN", ""))
    for token in tokens:
        check_secret("KEFU_INTERNAL_TOKEN", token)
    token = ",".join(tokens)
    mode = env_str(env, "KEFU_INTERNAL_AUTH", "required").lower()
    if mode not in ("required", "off"):
        raise SettingsError(f"KEFU_INTERNAL_AUTH must be required or off, got {mode!r}")
    if mode == "off":
        if token:
            raise SettingsError("KEFU_INTERNAL_AUTH=off contradicts KEFU_INTERNAL_TOKEN being set: unset one")
        return ""
    if not token:
        raise SettingsError("KEFU_INTERNAL_TOKEN is not set: internal gRPC calls need a shared secret of at "
                            f"least {MIN_SECRET_BYTES} bytes (KEFU_INTERNAL_AUTH=off disables the check, dev only)")
    return token


_NATS_USER = re.compile(r"[A-Za-z0-9_-]{1,64}")


def nats_url(env: Mapping[str, str]) -> str:
    """`KEFU_NATS_URL`, else the local server on `KEFU_NATS_PORT` that `make run` starts.

    `KEFU_NATS_USER` / `KEFU_NATS_PASSWORD` go into the URL (`nats://user:pass@host:port`, percent-encoded),
    as they may instead be written there directly: such a URL is a secret, never logged as is
    (services.common.nats_client splits it and logs `redacted()`)."""
    port = env_int(env, "KEFU_NATS_PORT", 4222, minimum=1, maximum=65535)
    url = env_str(env, "KEFU_NATS_URL", f"nats://127.0.0.1:{port}")
    user = env.get("KEFU_NATS_USER", "").strip()
    password = env.get("KEFU_NATS_PASSWORD", "")
    if bool(user) != bool(password):
        raise SettingsError("KEFU_NATS_USER and KEFU_NATS_PASSWORD must be set together")
    servers = [part.strip() for part in url.split(",") if part.strip()]
    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if parts.username is not None and user:
            raise SettingsError("KEFU_NATS_URL carries credentials and KEFU_NATS_USER is set too: use one")
        if parts.username is not None and not _NATS_USER.fullmatch(parts.username):
            raise SettingsError("the user in KEFU_NATS_URL must be 1-64 letters, digits, '_' or '-'")
    if not user:
        return url
    if not _NATS_USER.fullmatch(user):
        raise SettingsError(f"KEFU_NATS_USER must be 1-64 letters, digits, '_' or '-', got {user!r}")
    return ",".join(with_credentials(server, user, password) for server in servers)


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` with `user:password@` (percent-encoded) in front of its host."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunsplit(parts._replace(netloc=netloc))
