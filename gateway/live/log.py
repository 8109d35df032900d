"""Following a conversation's log in JetStream straight from the edge.

The session service writes the log (after its access and state checks); an edge only reads
it, as the tenant's staff would: every event, notes included. Which socket may see which
event (no notes for visitors, no void AI replies) the feed decides, as the session does for
its own readers. Reading the log here rather than through the session's Watch saves a gRPC
stream message per event and edge: the session's CPU went to relaying events it had just
stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from kefu.session.v1 import session_pb2
from services.common.conversation_log import LOG_STREAM, log_subject

log = logging.getLogger(__name__)

LogFollower = JetStreamContext.PushSubscription


def decode_event(data: bytes, seq: int) -> session_pb2.Message:
    """One stored record of the log (the session's JSON form) as the session API's Message."""
    raw: dict[str, Any] = json.loads(data)
    message = session_pb2.Message(
        id=raw["id"], role=raw["role"], content=raw["content"], created_at=float(raw["created_at"]),
        tokens=int(raw["tokens"]), seq=seq, kind=str(raw.get("kind", "message")),
        sender_id=str(raw.get("sender_id", "")), sender_name=str(raw.get("sender_name", "")),
        version=int(raw.get("version", 0)))
    state = raw.get("state")
    if state:
        message.state.CopyFrom(session_pb2.ConversationState(
            status=str(state["status"]), version=int(state["version"]), assignee=str(state.get("assignee", "")),
            assignee_name=str(state.get("assignee_name", "")), reason=str(state.get("reason", "")),
            since=float(state.get("since", 0.0))))
    return message


async def follow_log(nc: NatsClient, tenant: str, conversation_id: str, after_seq: int,
                     on_event: Callable[[session_pb2.Message], None]) -> LogFollower:
    """Call `on_event` with every event of the log with seq > `after_seq`, in order, then each new one.

    One ordered push consumer, in memory on the server: nats-py recreates it from the last
    delivered seq after a gap or a reconnect, so nothing falls out. Stop it with `stop_following`.
    """

    async def deliver(raw: Msg) -> None:
        seq = raw.metadata.sequence.stream
        try:
            event = decode_event(raw.data, seq)
        except (ValueError, KeyError, TypeError):
            log.warning("conversation log: undecodable event at seq %d skipped", seq)
            return
        on_event(event)

    config = (ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1)
              if after_seq else ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    return await nc.jetstream().subscribe(log_subject(tenant, conversation_id), stream=LOG_STREAM,
                                          ordered_consumer=True, config=config, cb=deliver)


async def stop_following(follower: LogFollower) -> None:
    """Unsubscribe and delete the consumer now (the server would keep it for its 5 s inactivity timer)."""
    consumer = follower._consumer  # nats-py keeps the current name (it changes on a reset) only here
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await follower.unsubscribe()
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await follower._js.delete_consumer(LOG_STREAM, consumer)
