"""The edge decodes the conversation log exactly as the session service writes it."""

from __future__ import annotations

import pytest

from gateway.live.log import decode_event
from services.session.models import ConversationState, StoredMessage
from services.session.server import to_proto

STORED = [
    StoredMessage(id="a" * 32, role="user", content="您好，订单到哪了？", created_at=1.5, tokens=7, encoding="o200k_base",
                  sender_id="visitor-1"),
    StoredMessage(id="b" * 32, role="assistant", content="It ships today.", created_at=2.0, tokens=4, version=3),
    StoredMessage(id="c" * 32, role="agent", content="checking", created_at=3.0, tokens=2, kind="note",
                  sender_id="agent-7", sender_name="Mei"),
    StoredMessage(id="d" * 32, role="system", content="status: human (claim)", created_at=4.0, tokens=5,
                  kind="state", state=ConversationState(status="human", version=4, assignee="agent-7",
                                                        assignee_name="Mei", reason="claim", since=4.0)),
    StoredMessage(id="e" * 32, role="system", content="status: ai (created)", created_at=5.0, tokens=5,
                  kind="state", state=ConversationState(since=5.0)),
]


@pytest.mark.parametrize("stored", STORED, ids=lambda m: f"{m.kind}-{m.role}")
def test_decode_event_matches_the_session_api(stored: StoredMessage) -> None:
    seq = 41
    decoded = decode_event(stored.to_json(), seq)
    expected = to_proto(StoredMessage.from_json(stored.to_json(), seq))
    assert decoded == expected
    assert decoded.seq == seq


def test_decode_event_refuses_a_record_without_its_fields() -> None:
    with pytest.raises(KeyError):
        decode_event(b'{"role": "user"}', 1)
    with pytest.raises(ValueError):
        decode_event(b"not json", 1)
