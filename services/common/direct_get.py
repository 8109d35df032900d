"""Batched JetStream direct gets (ADR-31, nats-server 2.11+): many stored messages in one request, no server state."""

from __future__ import annotations

import asyncio
import json

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.common.errors import KefuError, Unavailable

STALL_S = 5.0
"""Give up when no reply arrived for this long (not when a long answer takes a while)."""


class TooManyResults(KefuError):
    """A multi-subject direct get matched more subjects than the server answers in one go (413)."""


async def direct_get(nc: NatsClient, stream: str, request: dict[str, object]) -> list[Msg]:
    """One batched direct get on `stream` (nats-py has no API for it), paged if the server caps a batch.

    The server answers with the messages, then a `204 EOB` status carrying how many are still
    pending (asked again from the last seq), or `404` when nothing (more) matches; 413 is
    TooManyResults, any other status Unavailable, silence for STALL_S a NATS TimeoutError.
    Replies are collected by a callback, not one `next_msg` each: that costs a task and a future
    per message, which made reading a 500-message history take several times longer.
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
            received = len(messages)
            try:
                await asyncio.wait_for(asyncio.shield(finished), STALL_S)
                return messages
            except TimeoutError:
                if len(messages) == received:
                    raise nats.errors.TimeoutError from None
    finally:
        if not finished.done():
            finished.cancel()
        try:
            await subscription.unsubscribe()
        except nats.errors.Error:
            pass  # the connection went: the subscription went with it
