"""The metadata this process last read or wrote, so that an append need not read it again.

Appends check access against the session's metadata; reading it from here instead of NATS saves
one KV request per append. A stale entry (another replica wrote since) costs nothing but a retry:
a counter write's CAS fails and the store reads the key again, and the appends whose effect depends
on the state (a visitor's message, an AI answer) read it again after publishing anyway. Owner and
tenant never change, so access checks stay right; entries are trusted for a short time only, so a
session another replica deleted is noticed soon even without a write.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from services.session.models import SessionMeta

FRESH_S = 30.0
MAX_ENTRIES = 4096


class MetaCache:
    def __init__(self, fresh_s: float = FRESH_S, max_entries: int = MAX_ENTRIES) -> None:
        self._fresh_s = fresh_s
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[SessionMeta, int, float]] = OrderedDict()

    def get(self, key: str) -> tuple[SessionMeta, int] | None:
        """The metadata and KV revision last seen for `key`, if seen within the freshness window."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        meta, revision, seen_at = entry
        if time.monotonic() - seen_at > self._fresh_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return meta, revision

    def put(self, key: str, meta: SessionMeta, revision: int) -> None:
        current = self._entries.get(key)
        if current is not None and current[1] > revision:
            return  # a newer write of this process landed first
        self._entries[key] = (meta, revision, time.monotonic())
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
