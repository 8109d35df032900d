"""A conversation's stored events after a seq, in one batched direct get: no consumer, no server state."""

from __future__ import annotations

import asyncio
import json

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.common.conversation_log import LOG_STREAM

PAGE = 256
"""Events per direct-get page; the server pages longer answers itself (204 EOB with a pending count)."""
STALL_S = 5.0
"""Give up when no reply arrived for this long (not when a long log takes a while)."""


class CatchUpFailed(nats.errors.Error):
    """JetStream answered a direct get with an error status (the caller retries as for any NATS error)."""


async def read_after(nc: NatsClient, subject: str, after_seq: int) -> list[tuple[int, bytes]]:
    """(stream seq, data) of every event on `subject` with seq > `after_seq`, oldest first.

    ADR-31 batched direct get (nats-server 2.11+, the stream has allow_direct): the server
    answers with the messages, then `204 EOB` with how many remain (paged: ask again from the
    last seq), or `404` when nothing (more) matches. nats-py has no API for the batch form.
    """
    found: list[tuple[int, bytes]] = []
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    request: dict[str, object] = {"batch": PAGE, "next_by_subj": subject, "seq": after_seq + 1}
    api = f"$JS.API.DIRECT.GET.{LOG_STREAM}"
    inbox = nc.new_inbox()

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
            found.append((int(headers["Nats-Sequence"]), reply.data))
        elif status == "404":
            finish()
        elif status == "204":
            if int(headers.get("Nats-Num-Pending", "0")) == 0:
                finish()
            else:
                request["seq"] = int(headers["Nats-Last-Sequence"]) + 1
                await nc.publish(api, json.dumps(request).encode(), reply=inbox)
        else:
            finish(CatchUpFailed(f"direct get on {LOG_STREAM}: {status} {headers.get('Description', '')}"))

    subscription = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(api, json.dumps(request).encode(), reply=inbox)
        while True:
            received = len(found)
            try:
                await asyncio.wait_for(asyncio.shield(finished), STALL_S)
                return found
            except TimeoutError:
                if len(found) == received:
                    raise nats.errors.TimeoutError from None
    finally:
        if not finished.done():
            finished.cancel()
        try:
            await subscription.unsubscribe()
        except nats.errors.Error:
            pass  # the connection went: the subscription went with it
