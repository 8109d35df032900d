"""Batched JetStream reads that create no server state (ADR-31 direct gets), with a consumer fallback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.common.errors import KefuError, Unavailable
from services.session.models import new_id

READ_TIMEOUT_S = 5.0
MULTI_LAST_LIMIT = 1024
"""Most subjects one `multi_last` direct get answers for; beyond it the server says 413."""


class TooManyResults(KefuError):
    """A multi-subject direct get matched more subjects than the server answers in one go."""


async def direct_get(nc: NatsClient, stream: str, request: dict[str, Any]) -> list[Msg]:
    """One batched direct get (server 2.11+; nats-py has no API for it), paged if the server caps a batch.

    The server answers with the messages, then a `204 EOB` status carrying how many are
    still pending; `404` when nothing (more) matches. Replies are collected by a callback,
    not one `next_msg` each: that costs a task and a future per message, which made reading
    a 500-message history take several times longer.
    """
    messages: list[Msg] = []
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    request = dict(request)
    inbox = nc.new_inbox()
    subject = f"$JS.API.DIRECT.GET.{stream}"

    def finish(error: Exception | None = None) -> None:
        if not finished.done():
            if error is None:
                finished.set_result(None)
            else:
                finished.set_exception(error)

    async def on_reply(reply: Msg) -> None:
        if finished.done():
            return
        headers = reply.headers or {}
        status = headers.get("Status")
        if status is None:
            messages.append(reply)
        elif status == "404":
            finish()
        elif status == "204":
            if int(headers.get("Nats-Num-Pending", "0")) == 0:
                finish()
            else:
                request["seq"] = int(headers["Nats-Last-Sequence"]) + 1
                await nc.publish(subject, json.dumps(request).encode(), reply=inbox)
        elif status == "413":
            finish(TooManyResults(headers.get("Description", "")))
        else:
            finish(Unavailable(f"direct get on {stream}: {status} {headers.get('Description', '')}"))

    subscription = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, json.dumps(request).encode(), reply=inbox)
        while True:
            # Give up only when the answer stalls, not when a long history takes a while.
            received = len(messages)
            try:
                await asyncio.wait_for(asyncio.shield(finished), READ_TIMEOUT_S)
                return messages
            except TimeoutError:
                if len(messages) == received:
                    raise NatsTimeoutError from None
    finally:
        await subscription.unsubscribe()
        if not finished.done():
            finished.cancel()


async def last_per_subject(nc: NatsClient, stream: str, filter_subject: str, *,
                           batch_reads: bool) -> list[tuple[str, bytes]]:
    """(subject, data) of the newest message of every subject matching `filter_subject`.

    One direct get when the server has them and at most MULTI_LAST_LIMIT subjects match;
    else a short-lived consumer (last per subject), deleted right after.
    """
    if batch_reads:
        try:
            found = await direct_get(nc, stream, {"multi_last": [filter_subject], "batch": MULTI_LAST_LIMIT})
            return [((m.headers or {})["Nats-Subject"], m.data) for m in found if _is_value(m.headers, m.data)]
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
                try:
                    batch = await subscription.fetch(MULTI_LAST_LIMIT, timeout=2.0)
                except NatsTimeoutError:
                    break
                found += [(m.subject, m.data) for m in batch if _is_value(m.headers, m.data)]
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


def _is_value(headers: dict[str, str] | None, data: bytes) -> bool:
    """A KV value, not a delete or purge marker."""
    return bool(data) and not (headers and ("KV-Operation" in headers or "Nats-Marker-Reason" in headers))
