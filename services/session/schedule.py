"""Conversation timers as JetStream message schedules: one pending message per conversation and timer.

Stream `KEFU_TIMERS` (nats-server 2.12+, `allow_msg_schedules`):
- `kefu.timer.at.<timer>.<tenant>.<session_id>`: a schedule (`Nats-Schedule: @at <due>`). Its subject is
  its identity: arming a timer again replaces it (`max_msgs_per_subject` 1), purging the subject cancels it.
- `kefu.timer.due.<timer>.<tenant>.<session_id>`: what the server publishes at the due time and then
  removes the schedule. One durable work-queue consumer shared by every session replica takes each due
  message once (timers.py); acknowledged, it leaves the stream (work-queue retention).

So the timers cost nothing while they wait: the server keeps them, nobody reads an open conversation
to find the few that came due. A timer carries the state it was armed for (the state version, the time
of the newest event), so its handler acts only when nothing changed since, else re-arms or skips.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

from nats.aio.client import Client as NatsClient
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from services.common.errors import Unavailable
from services.common.nats_client import SHORT_DUPLICATE_WINDOW_S, ensure_stream
from services.session.models import OPEN_STATUSES, SessionMeta

log = logging.getLogger(__name__)

TIMERS_STREAM = "KEFU_TIMERS"
TIMERS_PREFIX = "kefu.timer"
SCHEDULE_PREFIX = f"{TIMERS_PREFIX}.at"
DUE_PREFIX = f"{TIMERS_PREFIX}.due"
WAIT, IDLE, PURGE = "wait", "idle", "purge"
TIMERS = (WAIT, IDLE, PURGE)
"""`wait`: unclaimed in the queue too long; `idle`: no event for too long; `purge`: closed past its retention."""
MIN_SERVER = (2, 12)
"""Message schedules (`@at`) came with nats-server 2.12."""


@dataclass(frozen=True, slots=True)
class TimerLimits:
    wait_s: float
    """KEFU_HANDOFF_WAIT_S: waiting for an agent longer than this sends a conversation back to the AI."""
    idle_s: float
    """KEFU_IDLE_CLOSE_S: an open conversation without a stored event this long is closed."""
    retention_s: float
    """KEFU_CLOSED_RETENTION_S: a closed conversation is purged this long after it closed."""

    def __post_init__(self) -> None:
        if min(self.wait_s, self.idle_s, self.retention_s) <= 0:
            raise ValueError(f"timer limits must be positive, got {self}")


@dataclass(frozen=True, slots=True)
class DueTimer:
    """One timer that came due, with the conversation's state it was armed for."""

    timer: str
    tenant: str
    session_id: str
    version: int
    """State version when armed: `wait` and `purge` act only while it is still the current one."""
    updated_at: float
    """Time of the conversation's newest event when armed: `idle` acts only if nothing newer came since."""
    owner: str
    """The visitor: `purge` also removes the visitor's index entry, even when the metadata is gone."""

    @classmethod
    def from_message(cls, subject: str, data: bytes) -> Self:
        """Raise ValueError on a subject or payload that is not a timer's."""
        parts = subject.split(".")
        if len(parts) != 6 or ".".join(parts[:3]) != DUE_PREFIX or parts[3] not in TIMERS:
            raise ValueError(f"not a due timer: {subject}")
        raw = json.loads(data)
        return cls(parts[3], parts[4], parts[5], int(raw["version"]), float(raw["updated_at"]), str(raw["owner"]))


def due_time(timer: str, meta: SessionMeta, limits: TimerLimits) -> float:
    if timer == WAIT:
        return meta.state.since + limits.wait_s
    if timer == IDLE:
        return meta.updated_at + limits.idle_s
    return meta.state.since + limits.retention_s


def timers_for(meta: SessionMeta) -> tuple[str, ...]:
    """The timers a conversation in this state needs armed (any other it had simply finds it changed)."""
    if meta.state.status == "waiting_human":
        return WAIT, IDLE
    if meta.state.status in OPEN_STATUSES:
        return (IDLE,)
    return (PURGE,)


def at_header(due: float) -> str:
    return "@at " + datetime.fromtimestamp(due, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TimerSchedule:
    """Arms and cancels the timers of conversations; the server fires them (timers.py handles them)."""

    def __init__(self, nc: NatsClient, limits: TimerLimits) -> None:
        self._js = nc.jetstream()
        self.limits = limits

    @classmethod
    async def open(cls, nc: NatsClient, limits: TimerLimits, *, replicas: int = 1) -> TimerSchedule:
        version = nc.connected_server_version
        if (version.major, version.minor) < MIN_SERVER:
            # An older server stores the schedules silently and never fires them: refuse to start instead.
            raise Unavailable(f"conversation timers need nats-server 2.12 or newer (message schedules), "
                              f"connected to {version.major}.{version.minor}.{version.patch}")
        await ensure_stream(nc.jetstream(), StreamConfig(
            name=TIMERS_STREAM, subjects=[f"{TIMERS_PREFIX}.>"], retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE, num_replicas=replicas, max_msgs_per_subject=1, allow_msg_schedules=True,
            # No timer carries a Nats-Msg-Id: a restart need not read back 2 minutes of them.
            duplicate_window=SHORT_DUPLICATE_WINDOW_S))
        return cls(nc, limits)

    async def changed(self, tenant: str, session_id: str, meta: SessionMeta) -> None:
        """Arm what the conversation's new state needs: called after each create and status change."""
        await asyncio.gather(*(self.arm(timer, tenant, session_id, meta) for timer in timers_for(meta)))

    async def arm(self, timer: str, tenant: str, session_id: str, meta: SessionMeta, *,
                  only_if_none: bool = False) -> None:
        """(Re)place the conversation's `timer`, due after the limit from `meta`'s state.

        `only_if_none`: leave a pending one in place (the server refuses the publish: APIError)."""
        payload = json.dumps({"version": meta.state.version, "updated_at": meta.updated_at,
                              "owner": meta.owner}, ensure_ascii=False).encode()
        headers = {"Nats-Schedule": at_header(due_time(timer, meta, self.limits)),
                   "Nats-Schedule-Target": f"{DUE_PREFIX}.{timer}.{tenant}.{session_id}"}
        if only_if_none:
            headers["Nats-Expected-Last-Subject-Sequence"] = "0"
        await self._js.publish(f"{SCHEDULE_PREFIX}.{timer}.{tenant}.{session_id}", payload, headers=headers)

    async def cancel(self, tenant: str, session_id: str) -> None:
        """Drop every pending timer of a conversation that is gone (one purge, by subject)."""
        await self._js.purge_stream(TIMERS_STREAM, subject=f"{SCHEDULE_PREFIX}.*.{tenant}.{session_id}")
