"""Canned replies: short texts an agent inserts with a shortcut, kept per tenant in the `kefu_canned` bucket."""

from __future__ import annotations

import builtins
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from gateway.directory.buckets import (
    CANNED,
    Buckets,
    LimitReached,
    decode,
    delete_if_present,
    encode,
    nats_errors,
    stored_time,
)
from gateway.errors import ApiError

MAX_PER_TENANT = 500
MAX_TITLE_CHARS = 100
MAX_TEXT_CHARS = 2000
MAX_SHORTCUT_CHARS = 32
MAX_QUERY_CHARS = 100


class ShortcutTaken(ApiError):
    status = 409

    def __init__(self, shortcut: str) -> None:
        super().__init__("shortcut_taken", f"another canned reply of this tenant has the shortcut {shortcut!r}")


@dataclass(frozen=True, slots=True)
class CannedReply:
    id: str
    title: str
    text: str
    shortcut: str
    """"" when it has none."""
    created_at: float
    created_by: str

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        if not self.shortcut:
            del data["shortcut"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> CannedReply | None:
        reply_id, title, text = data.get("id"), data.get("title"), data.get("text")
        shortcut, created_by = data.get("shortcut", ""), data.get("created_by", "")
        created_at = stored_time(data.get("created_at", 0))
        if not (isinstance(reply_id, str) and isinstance(title, str) and isinstance(text, str)
                and isinstance(shortcut, str) and isinstance(created_by, str) and created_at is not None):
            return None
        return cls(id=reply_id, title=title, text=text, shortcut=shortcut, created_at=created_at,
                   created_by=created_by)

    def matches(self, query: str) -> bool:
        """Case-insensitive substring of the title, text or shortcut; "" matches everything."""
        folded = query.casefold()
        return any(folded in field.casefold() for field in (self.title, self.text, self.shortcut))


class CannedReplies:
    def __init__(self, buckets: Buckets) -> None:
        self._buckets = buckets

    async def list(self, tenant: str, query: str = "") -> list[CannedReply]:
        """The tenant's replies matching `query`, by shortcut then title."""
        replies = [reply for reply in await self._all(tenant) if reply.matches(query)]
        return sorted(replies, key=lambda r: (not r.shortcut, r.shortcut.casefold(), r.title.casefold(), r.id))

    async def add(self, tenant: str, *, title: str, text: str, shortcut: str, created_by: str) -> CannedReply:
        """Store a new reply. Two concurrent adds may both pass the bound check: it can be exceeded by a few."""
        existing = await self._all(tenant)
        if len(existing) >= MAX_PER_TENANT:
            raise LimitReached("canned replies", MAX_PER_TENANT)
        if shortcut and any(r.shortcut.casefold() == shortcut.casefold() for r in existing):
            raise ShortcutTaken(shortcut)
        reply = CannedReply(secrets.token_hex(8), title, text, shortcut, round(time.time(), 3), created_by)
        kv = await self._buckets.open(CANNED)
        async with nats_errors():
            await kv.create(f"{tenant}.{reply.id}", encode(reply.to_json()))
        return reply

    async def delete(self, tenant: str, reply_id: str) -> bool:
        """False when the tenant has no reply with this id."""
        return await delete_if_present(await self._buckets.open(CANNED), f"{tenant}.{reply_id}")

    async def _all(self, tenant: str) -> builtins.list[CannedReply]:  # `list`: a method here
        replies = []
        for entry in await self._buckets.scan(CANNED, f"{tenant}.*"):
            data = decode(entry.value, f"{CANNED}/{entry.key}")
            reply = CannedReply.from_json(data) if data is not None else None
            if reply is not None:
                replies.append(reply)
        return replies
