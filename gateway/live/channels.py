"""Frames that are not stored (ai_delta, typing, read, queue pokes) between edge processes, over core NATS.

Stored events reach every edge through the conversation's JetStream log (gateway/live/log.py);
these do not need the log, only the other edges that hold sockets of the conversation
or agents of the tenant. An edge publishes with its own id and ignores what it sent
itself: it delivers to its own sockets directly, in order with the rest of its frames.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.bus import BusUnavailable, EdgeBus

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "kefu.live"


def conversation_subject(tenant: str, conversation_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{tenant}.c.{conversation_id}"


def desk_subject(tenant: str) -> str:
    """The agents' desk of a tenant: queue changes, assignments, presence."""
    return f"{SUBJECT_PREFIX}.{tenant}.desk"


Handler = Callable[[dict[str, Any]], None]


class LiveChannels:
    def __init__(self, bus: EdgeBus) -> None:
        self.bus = bus
        self.edge_id = secrets.token_hex(6)
        """This process among the edges: its own publications come back and are skipped."""

    async def publish(self, subject: str, payload: dict[str, Any]) -> None:
        """Best effort: a frame that is not stored may be lost when NATS is away (the next one follows)."""
        try:
            await self.bus.nc.publish(subject, json.dumps({**payload, "origin": self.edge_id}).encode())
        except (BusUnavailable, nats.errors.Error) as error:
            log.debug("live publish on %s skipped: %s", subject, error)

    async def subscribe(self, subject: str, handler: Handler) -> Subscription | None:
        """Call `handler` with every payload other edges publish on `subject`; None without NATS."""

        async def deliver(message: Msg) -> None:
            try:
                payload = json.loads(message.data)
            except ValueError:
                return
            if isinstance(payload, dict) and payload.get("origin") != self.edge_id:
                handler(payload)

        try:
            nc = await self.bus.connection(timeout_s=2.0)
            return await nc.subscribe(subject, cb=deliver)
        except (BusUnavailable, nats.errors.Error) as error:
            log.warning("live subscription to %s failed: %s", subject, error)
            return None


async def unsubscribe(subscription: Subscription | None) -> None:
    if subscription is None:
        return
    try:
        await subscription.unsubscribe()
    except nats.errors.Error:
        pass


