"""The `__main__` of every service: settings -> logging -> serve, with one-line setting errors."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from services.common.logs import configure_logging
from services.common.nats_client import NatsCredentialsRefused
from services.common.settings import SettingsError


class HasLogLevel(Protocol):
    @property
    def log_level(self) -> str: ...


S = TypeVar("S", bound=HasLogLevel)


def run_process(name: str, load_settings: Callable[[], S], serve: Callable[[S], Coroutine[Any, Any, None]]) -> None:
    try:
        settings = load_settings()
    except SettingsError as error:
        sys.exit(f"{name}: {error}")
    configure_logging(name, settings.log_level)
    try:
        asyncio.run(serve(settings))
    except NatsCredentialsRefused as error:
        # A configuration error like a bad setting: one line, no traceback, exit 1.
        sys.exit(f"{name}: {error}")
