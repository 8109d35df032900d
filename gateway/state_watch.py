"""Learning mid-answer that a conversation changed state (an agent claimed it), from its NATS log subject."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from gateway.live.log import decode_event
from services.common.conversation_log import LOG_STREAM, log_subject

log = logging.getLogger(__name__)

MAX_LOOK_BACK = 50
"""Events after the visitor's message read from the log to find a change stored before the watch began."""


def newer_state(data: bytes, seq: int, version: int) -> bool:
    """Whether a stored event is a state change past `version` (anything undecodable is not)."""
    try:
        event = decode_event(data, seq)
    except (ValueError, KeyError, TypeError):
        return False
    return event.kind == "state" and event.HasField("state") and event.state.version > version


class StateWatch:
    """Sets `changed` once the conversation's state moves past the version an answer was started under.

    The session publishes every stored event to the conversation's log subject; a plain subscription
    there hears each one as JetStream stores it, without a consumer. A change stored between the
    visitor's message and the subscription is found by reading the log once after subscribing. What
    slips past both (a change the stream had not stored yet when that read ran) is still caught when
    the answer is appended under `if_version` (ABORTED), only later.
    """

    def __init__(self, version: int) -> None:
        self.changed = asyncio.Event()
        self._version = version
        self._on_change: list[Callable[[], object]] = []
        self._subscription: Subscription | None = None
        self._look_back: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, nc: NatsClient, tenant: str, conversation_id: str, after_seq: int,
                    version: int) -> StateWatch:
        """Watch from the event after `after_seq` (the visitor's message) on; NATS errors propagate."""
        watch = cls(version)
        subject = log_subject(tenant, conversation_id)
        watch._subscription = await nc.subscribe(subject, cb=watch._heard)
        # Sent after the SUB on the same connection: the server registered the subscription first.
        watch._look_back = asyncio.create_task(watch._read_log(nc, subject, after_seq))
        return watch

    def on_change(self, callback: Callable[[], object]) -> None:
        """Call `callback` once the state changes (at once if it has): to stop a read that awaits the next
        delta, without a task racing each read against `changed`."""
        if self.changed.is_set():
            callback()
        else:
            self._on_change.append(callback)

    def _change(self) -> None:
        if self.changed.is_set():
            return
        self.changed.set()
        callbacks, self._on_change = self._on_change, []
        for callback in callbacks:
            callback()

    async def _heard(self, message: Msg) -> None:
        # The session's JetStream publish carries its ack inbox as reply subject: never answer it.
        if newer_state(message.data, 0, self._version):
            self._change()

    async def _read_log(self, nc: NatsClient, subject: str, after_seq: int) -> None:
        js = nc.jetstream()
        seq = after_seq
        try:
            for _ in range(MAX_LOOK_BACK):
                # A direct get (the log allows them): served by the stream, not the JetStream API. A replica a
                # moment behind may miss the newest event; the answer's conditional append still catches it.
                stored = await js.get_msg(LOG_STREAM, seq + 1, subject=subject, next=True, direct=True)
                if stored.seq is None or stored.data is None:
                    return
                if newer_state(stored.data, stored.seq, self._version):
                    self._change()
                    return
                seq = stored.seq
        except NotFoundError:
            return  # nothing (more) after the visitor's message
        except (nats.errors.Error, TimeoutError) as error:
            log.debug("state watch: log not read (%s)", error or type(error).__name__)

    async def stop(self) -> None:
        if self._look_back is not None and not self._look_back.done():
            self._look_back.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._look_back
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._subscription.unsubscribe()
            self._subscription = None
