"""The `__main__` of every service: settings -> logging -> serve on the event loop, with one-line setting errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Protocol, TypeVar

import uvloop

from services.common.logs import configure_logging
from services.common.nats_client import NatsCredentialsRefused
from services.common.settings import EventLoopSettings, SettingsError

log = logging.getLogger(__name__)


class HasLogLevel(Protocol):
    @property
    def log_level(self) -> str: ...


S = TypeVar("S", bound=HasLogLevel)
T = TypeVar("T")


def run_process(name: str, load_settings: Callable[[], S],
                serve: Callable[[S], Coroutine[object, object, None]]) -> None:
    try:
        settings = load_settings()
        loop_settings = EventLoopSettings.load()
    except SettingsError as error:
        sys.exit(f"{name}: {error}")
    configure_logging(name, settings.log_level)
    tune_garbage_collector()  # after the imports: what they made is frozen
    try:
        run_on_loop(serve(settings), loop_settings)
    except NatsCredentialsRefused as error:
        # A configuration error like a bad setting: one line, no traceback, exit 1.
        sys.exit(f"{name}: {error}")


def run_on_loop(main: Coroutine[object, object, T], settings: EventLoopSettings) -> T:
    """Run `main` to its end on a new uvloop (or asyncio's own loop with KEFU_UVLOOP=0)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if settings.uvloop else None) as runner:
        return runner.run(_announced(main))


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": the name the start-up log line gives the running loop."""
    return "uvloop" if isinstance(loop, uvloop.Loop) else "asyncio"


GC_YOUNG_THRESHOLD = 20_000
"""Tracked objects allocated (net of those freed) before a young-generation collection; CPython's default is
700. A turn makes thousands of short-lived objects, nearly all freed by reference counting, yet at 700 the
collector ran several times a turn: 2.5-3.5 % of the edge's and the worker's CPU under load (py-spy, issue 20)."""


def tune_garbage_collector() -> None:
    """Collect young objects less often, and never again look at what the imports made (gc.freeze)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def _announced(main: Coroutine[object, object, T]) -> T:
    # One line at start, so a deployment (and tests/e2e/test_event_loop.py) can see which loop runs.
    log.info("event loop: %s", loop_kind(asyncio.get_running_loop()))
    return await main
