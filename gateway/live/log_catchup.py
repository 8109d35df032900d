"""A conversation's stored events after a seq, in one batched direct get: no consumer, no server state."""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NatsClient

from services.common.conversation_log import LOG_STREAM
from services.common.direct_get import direct_get
from services.common.errors import KefuError

PAGE = 256
"""Events per direct-get page; the server pages longer answers itself (204 EOB with a pending count)."""


class CatchUpFailed(nats.errors.Error):
    """JetStream answered a direct get with an error status (the caller retries as for any NATS error)."""


async def read_after(nc: NatsClient, subject: str, after_seq: int) -> list[tuple[int, bytes]]:
    """(stream seq, data) of every event on `subject` with seq > `after_seq`, oldest first, in one
    batched direct get (services.common.direct_get)."""
    try:
        found = await direct_get(nc, LOG_STREAM, {"batch": PAGE, "next_by_subj": subject, "seq": after_seq + 1})
    except KefuError as error:  # an error status from the server: retried like any NATS error
        raise CatchUpFailed(str(error)) from None
    return [(int((message.headers or {})["Nats-Sequence"]), message.data) for message in found]
