"""The one settings loader: typed `KEFU_*` settings from the environment over a `.env` file, failing with one line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Self
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from services.common.errors import KefuError

MIN_SECRET_BYTES = 32
"""Shared secrets (the JWT HMAC key, the internal token) shorter than this are refused at start."""

ENV_FILE = Path(".env")
"""Read from the working directory when present; the process environment wins over it."""


class SettingsError(KefuError, ValueError):
    """A setting is missing or malformed; the message names the variable."""


class KefuSettings(BaseSettings):
    """Base of every process's settings: typed, frozen fields that `load()` reads from `KEFU_*` variables.

    A field reads `KEFU_<FIELD>` unless its `validation_alias` names the variable. Constructing a
    subclass takes the values given and reads nothing (tests, tools); `load()` reads the process
    environment over `./.env`. Fields with `repr=False` are secrets: never printed, used as given."""

    # extra="forbid" catches a misspelt constructor argument; load() passes only the fields' own variables, so
    # every other variable (another process's, or no setting at all) is ignored there.
    model_config = SettingsConfigDict(
        env_prefix="KEFU_", case_sensitive=True, frozen=True, extra="forbid", use_attribute_docstrings=True,
        validate_by_name=True, validate_by_alias=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The constructor takes its arguments alone, so a test's settings never depend on the shell or a .env.
        return (init_settings,)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, env_file: Path | str | None = None) -> Self:
        """The settings from `KEFU_*` variables (`environment()`), or SettingsError naming the first bad one."""
        values = VariablesSource(cls, cls.resolved(cls.environment(env, env_file)))()
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise settings_error(cls, error) from None

    @classmethod
    def environment(cls, env: Mapping[str, str] | None = None, env_file: Path | str | None = None) -> dict[str, str]:
        """The variables settings are read from: `env` over the variables of `env_file`.

        By default the process environment over the file KEFU_ENV_FILE names (`.env` in the working
        directory; empty: none), read when present. Tests pass `env`, read alone unless `env_file` is given."""
        if env is None:
            env = os.environ
            env_file = env_file or env.get("KEFU_ENV_FILE", str(ENV_FILE)).strip()
        return {**read_env_file(cls, env_file), **env} if env_file else dict(env)

    @classmethod
    def resolved(cls, variables: Mapping[str, str]) -> dict[str, str]:
        """`variables` with the settings made of several variables resolved into their field's variable."""
        resolved = dict(variables)
        if "nats_url" in cls.model_fields:
            resolved["KEFU_NATS_URL"] = nats_url(variables)
        if "internal_token" in cls.model_fields:
            resolved["KEFU_INTERNAL_TOKEN"] = internal_token(variables)
        return resolved

    @classmethod
    def variable(cls, field: str) -> str:
        """The variable `field` is read from."""
        return variable_of(cls.model_config.get("env_prefix", ""), field, cls.model_fields[field])

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Every field with the variable it is read from."""
        return {name: cls.variable(name) for name in cls.model_fields}


def variable_of(prefix: str, name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    return alias if isinstance(alias, str) else f"{prefix}{name}".upper()


def read_env_file(settings_cls: type[KefuSettings], path: Path | str) -> dict[str, str]:
    """The variables of a `.env` file (python-dotenv's syntax); none when it does not exist."""
    source = DotEnvSettingsSource(settings_cls, env_file=path, case_sensitive=True)
    return {name: value for name, value in source.env_vars.items() if value is not None}


class VariablesSource(PydanticBaseSettingsSource):
    """Each field's raw text from a mapping of variables; the model's validators parse it.

    Unset or blank variables leave the default; text is stripped except a secret's (`repr=False`)."""

    def __init__(self, settings_cls: type[KefuSettings], variables: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._variables = variables
        self._prefix = settings_cls.model_config.get("env_prefix", "")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[str | None, str, bool]:
        raw = self._variables.get(variable_of(self._prefix, field_name, field))
        if raw is None or not raw.strip():
            return None, field_name, False
        return (raw if not field.repr else raw.strip()), field_name, False

    def __call__(self) -> dict[str, object]:
        values: dict[str, object] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


def settings_error(settings_cls: type[KefuSettings], error: ValidationError) -> SettingsError:
    """One line naming the variable of the first error; a secret's value is never quoted."""
    details = error.errors()[0]
    cause = details.get("ctx", {}).get("error")
    if isinstance(cause, SettingsError):
        return cause  # our own validators' messages name their variables already
    location = details["loc"]
    if not location or str(location[0]) not in settings_cls.model_fields:
        return SettingsError(f"{settings_cls.__name__}: {' '.join(details['msg'].split())}")
    field = str(location[0])
    shown = details["input"] if settings_cls.model_fields[field].repr else "(hidden)"
    return SettingsError(f"{settings_cls.variable(field)} {_must(details, shown)}")


_PARSING = {"int_parsing": "an integer", "int_from_float": "an integer", "float_parsing": "a number",
            "bool_parsing": "true or false", "path_type": "a path"}
_BOUNDS = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}


def _must(details: ErrorDetails, shown: object) -> str:
    kind, ctx = details["type"], details.get("ctx", {})
    if kind in _PARSING:
        return f"must be {_PARSING[kind]}, got {shown!r}"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {_number(next(iter(ctx.values())))}, got {shown}"
    return "is wrong: " + " ".join(details["msg"].removeprefix("Value error, ").split())


def _number(limit: object) -> object:
    """60.0 as 60: a float field's bound reads as the variable would be written."""
    return int(limit) if isinstance(limit, float) and limit.is_integer() else limit


class EventLoopSettings(KefuSettings):
    """How every kefu process runs its event loop (services.common.entrypoint)."""

    uvloop: bool = True
    """KEFU_UVLOOP: run on uvloop, which grpc.aio, aiohttp and nats-py all support (issue 20: it cut the
    aiohttp client's CPU by about 45 % and nats-py's by 25-35 %); 0 falls back to asyncio's own loop,
    for debugging."""


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, default).strip() or default


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
    mode = _text(env, "KEFU_INTERNAL_AUTH", "required").lower()
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
    port = _text(env, "KEFU_NATS_PORT", "4222")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SettingsError(f"KEFU_NATS_PORT must be a port number 1..65535, got {port!r}")
    url = _text(env, "KEFU_NATS_URL", f"nats://127.0.0.1:{port}")
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
