"""Arm the timers of conversations stored before timers were schedules (issue 19): once per installation.

A session service that finds no `kefu.timer.backfilled` mark in KEFU_TIMERS reads the conversation index
once, in batches, and arms each conversation's timers from its entry, then sets the mark; every later
start reads nothing. A timer is armed only where none is pending (`Nats-Expected-Last-Subject-Sequence: 0`),
so a replica running this beside another that already arms timers never replaces a newer one; an entry
that lags its metadata only makes the timer fire early and find the conversation changed (re-arm or skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from services.common.nats_client import fetch_batch
from services.session.index import INDEX_STREAM, INDEX_SUBJECT_PREFIX, ConversationSummary
from services.session.models import SessionMeta, new_id
from services.session.schedule import TIMERS_PREFIX, TIMERS_STREAM, TimerSchedule, timers_for

log = logging.getLogger(__name__)

MARK_SUBJECT = f"{TIMERS_PREFIX}.backfilled"
BATCH = 512


async def arm_stored(nc: NatsClient, schedule: TimerSchedule) -> int:
    """Arm the timers of every indexed conversation unless done before; the number of conversations armed."""
    js = nc.jetstream()
    try:
        await js.get_last_msg(TIMERS_STREAM, MARK_SUBJECT)
        return 0
    except NotFoundError:
        pass
    name = new_id()
    # Status entries only (`<tenant>.<status>.<id>`; a visitor's are one token longer).
    await js.add_consumer(INDEX_STREAM, ConsumerConfig(
        name=name, filter_subject=f"{INDEX_SUBJECT_PREFIX}.*.*.*", deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True))
    armed = 0
    try:
        subscription = await js.pull_subscribe_bind(name=name, stream=INDEX_STREAM)
        try:
            while True:
                batch = await fetch_batch(subscription, BATCH, 2.0)
                if not batch:
                    break
                entries = [(m.subject, m.data) for m in batch if m.data and not m.headers]
                armed += sum(await asyncio.gather(*(_arm(schedule, s, d) for s, d in entries)))
                if batch[-1].metadata.num_pending == 0:
                    break
        finally:
            await subscription.unsubscribe()
    finally:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(INDEX_STREAM, name)
    await js.publish(MARK_SUBJECT, str(armed).encode())
    log.info("armed the timers of %d stored conversations", armed)
    return armed


async def _arm(schedule: TimerSchedule, subject: str, data: bytes) -> int:
    tenant, _, session_id = subject.removeprefix(INDEX_SUBJECT_PREFIX + ".").split(".")
    summary = ConversationSummary.from_json(tenant, session_id, data)
    meta = SessionMeta(tenant, summary.owner, summary.created_at, summary.updated_at, state=summary.state)
    for timer in timers_for(meta):
        with contextlib.suppress(APIError):  # one is pending already: the newer one stays
            await schedule.arm(timer, tenant, session_id, meta, only_if_none=True)
    return 1
