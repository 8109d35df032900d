"""The session service's timers: unclaimed conversations go back to the AI, idle ones are closed, closed ones
are purged after their retention.

The timers wait in nats-server as message schedules (schedule.py) and come due as messages on one durable
work-queue consumer that every replica pulls from, so each due timer is handled once and nothing is read
while none is due: the work follows the timers that come due, never the conversations open or stored. A
timer that finds its conversation changed since it was armed skips (or, for the idle close, re-arms at
the newest event); each change is a CAS on the conversation's metadata with the version it looked at, so
a timer that races an agent or another replica loses cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, replace

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.common.errors import KefuError
from services.common.nats_client import ensure_key_value, fetch_batch
from services.session.conversation import Change
from services.session.metrics import SessionMetrics
from services.session.models import OPEN_STATUSES, STATUSES, SessionMeta
from services.session.schedule import DUE_PREFIX, IDLE, PURGE, TIMERS_STREAM, WAIT, DueTimer, TimerSchedule
from services.session.store import SessionStore

log = logging.getLogger(__name__)

TENANTS_BUCKET = "kefu_tenants"
DEFAULT_LEAVE_MESSAGE = ("All our agents are busy right now. Leave a message and we will get back to you. / "
                         "客服暂时都在忙，请留言，我们会尽快回复您。")
TIMERS_CONSUMER = "kefu_session_timers"
"""Durable consumer of the due timers shared by every replica: each due timer goes to one of them."""
FETCH_BATCH = 64
FETCH_WAIT_S = 5.0
"""How long one pull waits for a timer to come due: the only wake-up of an idle replica's timers."""
SWEEP_QUIET_S = 0.3
"""sweep(): handle due timers until none came for this long."""
GAUGE_S = 30.0
"""How often `kefu_conversations` of the open statuses is refreshed (a count the server makes, nothing read here)."""
CLOSED_GAUGE_S = 300.0
"""The same for "closed": its count grows with what is stored (about 150 ms of server CPU per million)."""
ACK_WAIT_S = 30.0
MAX_DELIVER = 8
RETRY_S = 2.0


@dataclass(frozen=True, slots=True)
class SweepResult:
    timed_out: int = 0
    """Conversations sent back to the AI after waiting too long."""
    closed: int = 0
    """Conversations closed for being idle."""
    purged: int = 0
    """Closed conversations erased after their retention."""


class ConversationTimers:
    def __init__(self, store: SessionStore, schedule: TimerSchedule, tenants: KeyValue, metrics: SessionMetrics,
                 js: JetStreamContext) -> None:
        self._store = store
        self._schedule = schedule
        self._tenants = tenants
        self._metrics = metrics
        self._js = js
        self._subscription: JetStreamContext.PullSubscription | None = None

    @classmethod
    async def open(cls, nc: NatsClient, store: SessionStore, metrics: SessionMetrics, *,
                   replicas: int = 1) -> ConversationTimers:
        """Timers of `store`'s conversations, with the limits of the schedule that arms them."""
        if store.schedule is None:
            raise ValueError("the store arms no timers: open it with a TimerSchedule")
        tenants = await ensure_key_value(nc.jetstream(), KeyValueConfig(
            bucket=TENANTS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas))
        return cls(store, store.schedule, tenants, metrics, nc.jetstream())

    async def run(self) -> None:
        """Handle timers as they come due, and refresh the gauge every GAUGE_S, until cancelled;
        a failure (NATS away) is logged and retried."""
        next_open = next_closed = 0.0
        try:
            while True:
                try:
                    if time.monotonic() >= next_open:
                        await self.count(OPEN_STATUSES)
                        next_open = time.monotonic() + GAUGE_S
                    if time.monotonic() >= next_closed:
                        await self.count(("closed",))
                        next_closed = time.monotonic() + CLOSED_GAUGE_S
                    await self._handle_batch(await self._fetch(FETCH_WAIT_S), SweepResult())
                except (KefuError, NatsError, TimeoutError) as error:
                    log.warning("conversation timers: %s", str(error) or type(error).__name__)
                    await self._drop_subscription()
                    await asyncio.sleep(RETRY_S)
                except Exception:
                    log.exception("conversation timers failed")
                    await self._drop_subscription()
                    await asyncio.sleep(RETRY_S)
        finally:
            await self._drop_subscription()

    async def sweep(self) -> SweepResult:
        """Handle every timer due now (until none came for SWEEP_QUIET_S) and refresh the gauge."""
        result = SweepResult()
        while batch := await self._fetch(SWEEP_QUIET_S):
            result = await self._handle_batch(batch, result)
        await self.count()
        return result

    async def count(self, statuses: tuple[str, ...] = STATUSES) -> None:
        for status in statuses:
            self._metrics.conversations.labels(status).set(await self._store.index.count(status))

    async def _fetch(self, timeout_s: float) -> list[Msg]:
        if self._subscription is None:
            self._subscription = await self._js.pull_subscribe(
                f"{DUE_PREFIX}.>", durable=TIMERS_CONSUMER, stream=TIMERS_STREAM,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                                      ack_wait=ACK_WAIT_S, max_deliver=MAX_DELIVER))
        return await fetch_batch(self._subscription, FETCH_BATCH, timeout_s)

    async def _drop_subscription(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await subscription.unsubscribe()

    async def _handle_batch(self, batch: list[Msg], result: SweepResult) -> SweepResult:
        outcomes = await asyncio.gather(*(self._handle(message) for message in batch))
        acted = [timer for timer, outcome in outcomes if outcome == "acted"]
        return SweepResult(result.timed_out + acted.count(WAIT), result.closed + acted.count(IDLE),
                           result.purged + acted.count(PURGE))

    async def _handle(self, message: Msg) -> tuple[str, str]:
        """(timer, outcome): acted, rearmed, skipped (changed since), gone (no such conversation) or failed."""
        try:
            timer = DueTimer.from_message(message.subject, message.data)
        except (ValueError, KeyError, TypeError):
            log.warning("dropping a malformed due timer on %s", message.subject)
            await message.term()
            self._metrics.timers.labels("unknown", "failed").inc()
            return "unknown", "failed"
        handler = {WAIT: self._time_out, IDLE: self._close_idle, PURGE: self._purge}[timer.timer]
        try:
            outcome = await handler(timer)
        except (KefuError, NatsError, TimeoutError) as error:
            # Passing trouble (NATS away, a CAS storm): redelivered later, backing off; after MAX_DELIVER
            # tries it is dropped, so it does not stay in the work queue (the TTL still ends the conversation).
            log.warning("%s timer of %s: %s", timer.timer, timer.session_id, str(error) or type(error).__name__)
            delivered = message.metadata.num_delivered or 1
            with contextlib.suppress(NatsError, TimeoutError):
                await (message.term() if delivered >= MAX_DELIVER else message.nak(delay=RETRY_S * delivered))
            outcome = "failed"
        except Exception:
            # A bug would fail again on every redelivery: drop this timer (the TTL still ends the conversation).
            log.exception("%s timer of %s failed", timer.timer, timer.session_id)
            await message.term()
            outcome = "failed"
        else:
            await message.ack()
        self._metrics.timers.labels(timer.timer, outcome).inc()
        return timer.timer, outcome

    async def _read(self, timer: DueTimer) -> tuple[SessionMeta, int] | None:
        self._metrics.timer_reads.inc()
        return await self._store.read_entry(timer.tenant, timer.session_id)

    async def _time_out(self, timer: DueTimer) -> str:
        entry = await self._read(timer)
        if entry is None:
            return "gone"
        state = entry[0].state
        if state.status != "waiting_human" or state.version != timer.version:
            return "skipped"  # claimed, released or closed since; a new wait has its own timer
        try:
            result = await self._store.transition_as_service(
                timer.tenant, timer.session_id, Change("wait_timeout", expected_version=timer.version), entry)
        except KefuError:
            return "skipped"  # another replica (or an agent) changed it first
        if result is None or result.unchanged:
            return "skipped"
        await self._store.append_system(timer.tenant, timer.session_id, await self.leave_message(timer.tenant))
        return "acted"

    async def _close_idle(self, timer: DueTimer) -> str:
        entry = await self._read(timer)
        if entry is None:
            return "gone"
        meta = entry[0]
        if meta.state.status == "closed":
            return "skipped"
        # Counters reach the metadata within a second (pending.py): the log has the newest event at once.
        meta = replace(meta, updated_at=await self._store.last_event_at(timer.tenant, timer.session_id, meta))
        if meta.updated_at > timer.updated_at:
            # Active since it was armed: due again an idle limit after its newest event. The index
            # entry is written again too, so it neither ages out nor lags by more than that limit.
            await self._schedule.arm(IDLE, timer.tenant, timer.session_id, meta)
            await self._store.index.project(timer.tenant, timer.session_id, meta,
                                            lambda: self._store.read_meta(timer.tenant, timer.session_id),
                                            moved=False)
            return "rearmed"
        try:
            result = await self._store.transition_as_service(
                timer.tenant, timer.session_id, Change("idle", expected_version=meta.state.version), entry)
        except KefuError:
            return "skipped"
        return "acted" if result is not None and not result.unchanged else "skipped"

    async def _purge(self, timer: DueTimer) -> str:
        entry = await self._read(timer)
        if entry is None:
            # The metadata aged out (TTL) first: its messages and index entries still go.
            await self._store.purge(timer.tenant, timer.session_id, timer.owner, None)
            return "acted"
        meta = entry[0]
        if meta.state.status != "closed" or meta.state.version != timer.version:
            return "skipped"  # reopened since; its next close arms a new purge
        purged = await self._store.purge(timer.tenant, timer.session_id, meta.owner, entry)
        return "acted" if purged else "skipped"

    async def leave_message(self, tenant: str) -> str:
        """The tenant's leave-a-message text (`kefu_tenants` key `<tenant>`, field `leave_message`)."""
        try:
            entry = await self._tenants.get(tenant)
        except KeyNotFoundError:
            return DEFAULT_LEAVE_MESSAGE
        try:
            text = json.loads(entry.value or b"{}").get("leave_message")
        except (ValueError, AttributeError):
            log.warning("tenant %s: its settings are not a JSON object; default leave message", tenant)
            return DEFAULT_LEAVE_MESSAGE
        return text if isinstance(text, str) and text else DEFAULT_LEAVE_MESSAGE
