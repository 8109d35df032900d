"""The newest message per subject, by batched direct get (services.common.direct_get) or a short-lived consumer."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.common.direct_get import TooManyResults, direct_get
from services.common.nats_client import fetch_batch
from services.session.models import new_id

MULTI_LAST_LIMIT = 1024
"""Most subjects one `multi_last` direct get answers for; beyond it the server says 413."""


async def last_per_subject(nc: NatsClient, stream: str, filter_subject: str, *,
                           batch_reads: bool) -> list[tuple[str, bytes]]:
    """(subject, data) of the newest message of every subject matching `filter_subject`.

    One direct get when the server has them and at most MULTI_LAST_LIMIT subjects match;
    else a short-lived consumer (last per subject), deleted right after.
    """
    if batch_reads:
        try:
            found = await direct_get(nc, stream, {"multi_last": [filter_subject], "batch": MULTI_LAST_LIMIT})
            return [((m.headers or {})["Nats-Subject"], m.data) for m in found if is_value(m.headers, m.data)]
        except TooManyResults:
            pass
    return await _consume_last_per_subject(nc, stream, filter_subject)


async def count_subjects(nc: NatsClient, stream: str, filter_subject: str) -> int:
    """How many subjects matching `filter_subject` hold a message, counted by the server."""
    js = nc.jetstream()
    info = await js.add_consumer(stream, ConsumerConfig(
        name=new_id(), filter_subject=filter_subject, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True))
    try:
        return int(info.num_pending or 0)
    finally:
        await _delete_consumer(nc, stream, info.name)


async def _consume_last_per_subject(nc: NatsClient, stream: str, filter_subject: str) -> list[tuple[str, bytes]]:
    js = nc.jetstream()
    name = new_id()
    info = await js.add_consumer(stream, ConsumerConfig(
        name=name, filter_subject=filter_subject, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True))
    found: list[tuple[str, bytes]] = []
    try:
        if not info.num_pending:
            return found
        subscription = await js.pull_subscribe_bind(name=name, stream=stream)
        try:
            while True:
                batch = await fetch_batch(subscription, MULTI_LAST_LIMIT, 2.0)
                found += [(m.subject, m.data) for m in batch if is_value(m.headers, m.data)]
                if not batch or batch[-1].metadata.num_pending == 0:
                    break
        finally:
            await subscription.unsubscribe()
    finally:
        await _delete_consumer(nc, stream, name)
    return found


async def _delete_consumer(nc: NatsClient, stream: str, name: str) -> None:
    try:
        await nc.jetstream().delete_consumer(stream, name)
    except NotFoundError:
        pass  # the inactivity threshold took it already


def is_value(headers: dict[str, str] | None, data: bytes) -> bool:
    """A KV value, not a delete or purge marker."""
    return bool(data) and not (headers and ("KV-Operation" in headers or "Nats-Marker-Reason" in headers))
