"""A store whose conversation log is full: 8 KiB in all, filled by one visitor's conversation."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NatsClient

from services.session.errors import StorageFull
from services.session.models import Principal
from services.session.store import SessionStore
from services.session.tokens import TokenCounter


async def store_with_a_full_log(nats_client: NatsClient, counter: TokenCounter,
                                visitor: Principal) -> tuple[SessionStore, str]:
    """The store and the conversation that filled its log (the last append was refused with StorageFull)."""
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=5000, ttl_s=3600,
                                    max_bytes=8192)
    session_id = (await store.append(visitor, "", "user", "first")).session_id
    with pytest.raises(StorageFull):
        for _ in range(10):
            await store.append(visitor, session_id, "user", "x" * 1500)
    return store, session_id
