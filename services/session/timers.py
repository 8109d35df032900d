"""The session service's timers: unclaimed conversations go back to the AI, idle ones are closed.

Every replica sweeps; each change is a CAS on the conversation's metadata with the version
it looked at, so when two replicas act on the same conversation one wins and the other skips.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.common.errors import KefuError
from services.common.nats_client import ensure_key_value
from services.session.conversation import Change
from services.session.index import ConversationSummary
from services.session.metrics import SessionMetrics
from services.session.models import OPEN_STATUSES, STATUSES, SessionMeta
from services.session.store import SessionStore

log = logging.getLogger(__name__)

TENANTS_BUCKET = "kefu_tenants"
DEFAULT_LEAVE_MESSAGE = ("All our agents are busy right now. Leave a message and we will get back to you. / "
                         "客服暂时都在忙，请留言，我们会尽快回复您。")


@dataclass(frozen=True, slots=True)
class SweepResult:
    timed_out: int = 0
    """Conversations sent back to the AI after waiting too long."""
    closed: int = 0
    """Conversations closed for being idle."""


class ConversationTimers:
    def __init__(self, store: SessionStore, tenants: KeyValue, metrics: SessionMetrics, *,
                 wait_s: float, idle_s: float, sweep_s: float) -> None:
        self._store = store
        self._tenants = tenants
        self._metrics = metrics
        self._wait_s = wait_s
        self._idle_s = idle_s
        self.sweep_s = sweep_s

    @classmethod
    async def open(cls, nc: NatsClient, store: SessionStore, metrics: SessionMetrics, *, wait_s: float,
                   idle_s: float, sweep_s: float, replicas: int = 1) -> ConversationTimers:
        tenants = await ensure_key_value(nc.jetstream(), KeyValueConfig(
            bucket=TENANTS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas))
        return cls(store, tenants, metrics, wait_s=wait_s, idle_s=idle_s, sweep_s=sweep_s)

    async def run(self) -> None:
        """Sweep every `sweep_s` until cancelled; a failed sweep (NATS away) is logged and retried."""
        while True:
            try:
                await self.sweep()
            except (KefuError, NatsError, TimeoutError) as error:
                log.warning("conversation sweep: %s", str(error) or type(error).__name__)
            except Exception:
                log.exception("conversation sweep failed")
            await asyncio.sleep(self.sweep_s)

    async def sweep(self) -> SweepResult:
        now = time.time()
        timed_out = closed = 0
        for status in OPEN_STATUSES:
            for summary in await self._store.index.in_status("*", status):
                if status == "waiting_human" and now - summary.state.since >= self._wait_s:
                    timed_out += await self._time_out(summary, now)
                elif now - summary.updated_at >= self._idle_s:
                    closed += await self._close_idle(summary, now)
        for status in STATUSES:
            self._metrics.conversations.labels(status).set(await self._store.index.count(status))
        return SweepResult(timed_out, closed)

    async def _entry_or_forget(self, summary: ConversationSummary) -> tuple[SessionMeta, int] | None:
        """The conversation's metadata; None, and its index entry dropped, when the session is gone."""
        entry = await self._store.read_entry(summary.tenant, summary.session_id)
        if entry is None:
            await self._store.index.remove(summary.tenant, summary.session_id, summary.owner)
        return entry

    async def _time_out(self, summary: ConversationSummary, now: float) -> int:
        entry = await self._entry_or_forget(summary)
        if entry is None:
            return 0
        meta = entry[0]
        if meta.state.status != "waiting_human" or now - meta.state.since < self._wait_s:
            await self._repair(summary, meta)
            return 0
        try:
            result = await self._store.transition_as_service(
                summary.tenant, summary.session_id, Change("wait_timeout", expected_version=meta.state.version),
                entry)
        except KefuError:
            return 0  # another replica (or an agent) changed it first
        if result is None or result.unchanged:
            return 0
        text = await self.leave_message(summary.tenant)
        await self._store.append_system(summary.tenant, summary.session_id, text)
        return 1

    async def _close_idle(self, summary: ConversationSummary, now: float) -> int:
        entry = await self._entry_or_forget(summary)
        if entry is None:
            return 0
        meta = entry[0]
        if meta.state.status == "closed" or now - meta.updated_at < self._idle_s:
            # The entry lags (its time is only written on changes): bring it up to date, so this
            # conversation is looked at again only after another idle limit.
            await self._repair(summary, meta)
            return 0
        try:
            result = await self._store.transition_as_service(
                summary.tenant, summary.session_id, Change("idle", expected_version=meta.state.version), entry)
        except KefuError:
            return 0
        return int(result is not None and not result.unchanged)

    async def _repair(self, summary: ConversationSummary, meta: SessionMeta) -> None:
        await self._store.index.project(summary.tenant, summary.session_id, meta,
                                        lambda: self._store.read_meta(summary.tenant, summary.session_id),
                                        moved=meta.state.status != summary.state.status)

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
