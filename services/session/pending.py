"""Counters of stored messages not yet in their session's metadata: written behind, once a window per session.

An ordinary message costs one JetStream write, its publish to the log (issue 20 item 5). Its counters,
preview, answer lease and the metadata key's TTL refresh gather here and reach the key in one
compare-and-set at most once per window (`flush_s`, a second) per session, however many messages came
in it. This process's reads add what is pending (`peek`); a state change, a claim or a flush takes it
(`take`) into its own write and gives it back (`restore`) when that write does not happen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.session.models import MetaDelta, StoredMessage

log = logging.getLogger(__name__)

FLUSH_S = 1.0
CLOSE_ROUNDS = 3
"""Flush attempts at shutdown before what is still pending is given up."""


@dataclass(slots=True)
class Pending:
    delta: MetaDelta = field(default_factory=MetaDelta)
    seqs: list[int] = field(default_factory=list)
    """Log sequences of the messages counted: deleted again if their session turns out gone."""

    def merge(self, other: Pending) -> None:
        self.delta.merge(other.delta)
        self.seqs.extend(other.seqs)


class PendingCounters:
    """Per session key: what is pending, and the one flush scheduled for it."""

    def __init__(self, flush: Callable[[str], Awaitable[None]], flush_s: float = FLUSH_S) -> None:
        self._flush = flush
        self._flush_s = flush_s
        self._pending: dict[str, Pending] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._running: set[asyncio.Task[None]] = set()

    def add(self, key: str, message: StoredMessage) -> None:
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = Pending()
        pending.delta.add(message)
        pending.seqs.append(message.seq)
        self._schedule(key)

    def peek(self, key: str) -> MetaDelta | None:
        pending = self._pending.get(key)
        return pending.delta if pending is not None else None

    def take(self, key: str) -> Pending | None:
        """What is pending for `key`, now the caller's to write (or to give back)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        return self._pending.pop(key, None)

    def restore(self, key: str, pending: Pending | None) -> None:
        """Give back what a write did not take, merged with what came meanwhile."""
        if pending is None:
            return
        current = self._pending.get(key)
        if current is None:
            self._pending[key] = pending
        else:
            pending.merge(current)
            self._pending[key] = pending
        self._schedule(key)

    def __len__(self) -> int:
        return len(self._pending)

    async def flush_all(self) -> None:
        """Flush everything pending now and wait for every flush (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for _ in range(CLOSE_ROUNDS):
            for key in list(self._pending):
                self._start(key)
            if self._running:
                await asyncio.wait(set(self._running))
            if not self._pending:
                break
        for timer in self._timers.values():
            timer.cancel()  # NATS away at shutdown: what is left is lost, as a crash would lose it
        self._timers.clear()
        if self._pending:
            log.warning("counters of %d sessions not written at shutdown", len(self._pending))

    def _schedule(self, key: str) -> None:
        if key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(self._flush_s, self._start, key)

    def _start(self, key: str) -> None:
        self._timers.pop(key, None)
        task = asyncio.create_task(self._run(key))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, key: str) -> None:
        try:
            await self._flush(key)
        except Exception:
            # The flush gives back what it could not write; anything else is a bug, not worth the service.
            log.exception("session %s: counters not written", key)
