"""A page of the agent queue, oldest first by join time, read from the queue markers' start (index.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.common.direct_get import direct_get
from services.common.errors import Unavailable
from services.session.index import (
    INDEX_STREAM,
    INDEX_SUBJECT_PREFIX,
    QUEUE_STATUS,
    ConversationIndex,
    ConversationSummary,
    QueueMarker,
    joined_key,
    summary_of,
)
from services.session.reads import is_value

FIRST_WINDOW_SLACK = 8
"""Markers read beyond the page in the first window (a dangling one is skipped); then four times more each round."""
JOIN_SKEW_S = 1.0
"""How much later than its `since` a marker may land behind others (the projection follows the metadata
write by milliseconds): after the page is full, markers go on being read until they joined this much after
its last entry. One landing later than that may show below some that joined after it."""
STATUS_GETS = 256
"""Conversations whose status entries one batched direct get asks for (each may briefly stand in two)."""
STALL_S = 5.0
"""Give up when no reply came for this long (as services.common.direct_get)."""

Accept = Callable[[ConversationSummary], bool]
SortKey = tuple[float, str]


async def oldest_waiting(index: ConversationIndex, tenant: str, limit: int,
                         accept: Accept | None = None) -> list[ConversationSummary]:
    """At least the `limit` entries of the tenant's queue that `accept` which joined it first (all when fewer).

    The markers lie in the stream in join order: they are read from its start in windows, each one
    direct get of the next markers, then one batched direct get of those conversations' status entries
    (the newest version of each wins: a marker may dangle while a projection moves its entry). A page
    costs what it shows (and the markers of those waiting that `accept` refuses), not the whole queue.
    """
    if not index.batch_reads:
        return [s for s in await index.in_status(tenant, QUEUE_STATUS) if accept is None or accept(s)]
    filter_subject = f"{INDEX_SUBJECT_PREFIX}.{joined_key(tenant, '*')}"
    found: dict[str, ConversationSummary] = {}
    seq, window = 1, max(1, limit) + FIRST_WINDOW_SLACK
    while True:
        markers, next_seq = await _next_markers(index.nc, {"seq": seq, "next_by_subj": filter_subject,
                                                           "batch": window})
        cutoff = _cutoff(found, limit)
        wanted = [session_id for session_id, marker in markers
                  if cutoff is None or (marker.since, session_id) <= cutoff]
        for summary in await _waiting(index.nc, tenant, wanted):
            if accept is None or accept(summary):
                found[summary.session_id] = summary
        cutoff = _cutoff(found, limit)
        if cutoff is None:
            window *= 4
        elif not markers or markers[-1][1].since > cutoff[0] + JOIN_SKEW_S:
            return list(found.values())
        else:  # full: only the markers that landed late are still wanted, a page's worth at a time at most
            window = max(1, limit)
        if next_seq is None:
            return list(found.values())
        seq = next_seq


def _cutoff(found: dict[str, ConversationSummary], limit: int) -> SortKey | None:
    """The sort key of the page's last entry once the page is full."""
    if len(found) < max(1, limit):
        return None
    return sorted((s.state.since, s.session_id) for s in found.values())[max(1, limit) - 1]


async def _waiting(nc: NatsClient, tenant: str, session_ids: list[str]) -> list[ConversationSummary]:
    """The newest status entry of each conversation, where that is a waiting one."""
    chunks = [session_ids[n:n + STATUS_GETS] for n in range(0, len(session_ids), STATUS_GETS)]
    replies = await asyncio.gather(*(direct_get(nc, INDEX_STREAM, {
        "multi_last": [f"{INDEX_SUBJECT_PREFIX}.{tenant}.*.{session_id}" for session_id in chunk],
        "batch": 4 * len(chunk)}) for chunk in chunks))
    newest: dict[str, ConversationSummary] = {}
    for message in (m for reply in replies for m in reply):
        if not is_value(message.headers, message.data):
            continue
        summary = summary_of(message.headers or {}, message.data)
        seen = newest.get(summary.session_id)
        if seen is None or summary.state.version > seen.state.version:
            newest[summary.session_id] = summary
    return [s for s in newest.values() if s.state.status == QUEUE_STATUS]


async def _next_markers(nc: NatsClient, request: dict[str, object]) -> tuple[list[tuple[str, QueueMarker]], int | None]:
    """One batch of a direct get (services.common.direct_get reads on to the end): (session id, marker) of
    each marker in stream order, and the sequence the next batch starts at (None: the stream's end)."""
    replies = await _one_batch(nc, request)
    markers = []
    for reply in replies[:-1]:
        headers = reply.headers or {}
        if is_value(headers, reply.data):
            markers.append((headers["Nats-Subject"].rsplit(".", 1)[1], QueueMarker.from_json(reply.data)))
    end = replies[-1].headers or {}
    if end.get("Status") != "204" or int(end.get("Nats-Num-Pending", "0")) == 0:
        return markers, None
    return markers, int(end["Nats-Last-Sequence"]) + 1


async def _one_batch(nc: NatsClient, request: dict[str, object]) -> list[Msg]:
    """The replies of one batched direct get on the index, its closing status (204 or 404) last."""
    replies: list[Msg] = []
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_reply(reply: Msg) -> None:
        if ended.done():
            return
        replies.append(reply)
        status = (reply.headers or {}).get("Status")
        if status in ("204", "404"):
            ended.set_result(None)
        elif status is not None:
            ended.set_exception(Unavailable(f"direct get on {INDEX_STREAM}: {status} "
                                            f"{(reply.headers or {}).get('Description', '')}"))

    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{INDEX_STREAM}", json.dumps(request).encode(), reply=inbox)
        while True:
            received = len(replies)
            try:
                await asyncio.wait_for(asyncio.shield(ended), STALL_S)
                return replies
            except TimeoutError:
                if len(replies) == received:
                    raise nats.errors.TimeoutError from None
    finally:
        if not ended.done():
            ended.cancel()
        try:
            await subscription.unsubscribe()
        except nats.errors.Error:
            pass  # the connection went: the subscription went with it
