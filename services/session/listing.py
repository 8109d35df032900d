"""Lists of conversations: a tenant's for staff (from the index), a visitor's own (from the metadata)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from services.common.errors import InvalidArgument
from services.session.index import QUEUE_STATUS, ConversationSummary
from services.session.models import OPEN_STATUSES, SESSION_ID_PATTERN, STATUSES, Principal
from services.session.queue_page import oldest_waiting
from services.session.store import SessionStore

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def check_limit(limit: int) -> int:
    if limit < 0:
        raise InvalidArgument("limit must not be negative")
    return min(limit or DEFAULT_LIMIT, MAX_LIMIT)


async def list_conversations(store: SessionStore, principal: Principal, status: str, assignee: str,
                             limit: int) -> list[ConversationSummary]:
    """Staff: their tenant's conversations in `status` (empty: every open one), optionally only
    those `assignee` holds. Visitors: their own (`assignee` does not apply)."""
    if status and status not in STATUSES:
        raise InvalidArgument(f"status must be one of {list(STATUSES)} or empty")
    limit = check_limit(limit)
    statuses = (status,) if status else OPEN_STATUSES
    if not principal.is_staff:
        return order(await _own(store, principal, statuses), status)[:limit]
    def held(summary: ConversationSummary) -> bool:
        return not assignee or summary.state.assignee == assignee

    found = await asyncio.gather(*(_page(store, principal.tenant, s, limit, held, queue=status == QUEUE_STATUS)
                                   for s in statuses))
    summaries = [s for s in newest_entries(s for entries in found for s in entries) if held(s)]
    return order(summaries, status)[:limit]


async def _page(store: SessionStore, tenant: str, status: str, limit: int,
                held: Callable[[ConversationSummary], bool], *, queue: bool) -> list[ConversationSummary]:
    """The entries of one status a page may show: the queue (`queue`) is served oldest first by when each
    entry joined it, so its first (queue_page.py); every other list, the open ones together too, is newest
    first, so only its newest (index.newest_in_status)."""
    if queue:
        return await oldest_waiting(store.index, tenant, limit, held)
    return await store.index.newest_in_status(tenant, status, limit, held)


async def _own(store: SessionStore, principal: Principal, statuses: tuple[str, ...]) -> list[ConversationSummary]:
    # A visitor has few conversations, and the one the edge looks for must be exact: read the metadata.
    session_ids = await store.index.sessions_of_visitor(principal.tenant, principal.subject)
    session_ids = [s for s in session_ids if SESSION_ID_PATTERN.fullmatch(s)]
    metas = await asyncio.gather(*(store.read_meta(principal.tenant, s) for s in session_ids))
    return [ConversationSummary.of(session_id, meta) for session_id, meta in zip(session_ids, metas, strict=True)
            if meta is not None and meta.owner == principal.subject and meta.state.status in statuses]


def newest_entries(summaries: Iterable[ConversationSummary]) -> list[ConversationSummary]:
    """One summary per conversation: while a projection moves an entry, it may briefly stand in two statuses."""
    newest: dict[str, ConversationSummary] = {}
    for summary in summaries:
        seen = newest.get(summary.session_id)
        if seen is None or summary.state.version > seen.state.version:
            newest[summary.session_id] = summary
    return list(newest.values())


def order(summaries: list[ConversationSummary], status: str) -> list[ConversationSummary]:
    """The queue ("waiting_human") oldest first by `since`, as it is served; any other list newest first."""
    if status == QUEUE_STATUS:
        return sorted(summaries, key=lambda s: (s.state.since, s.session_id))
    return sorted(summaries, key=lambda s: (s.updated_at, s.session_id), reverse=True)
