"""Who sees which event of a conversation log (pure): void AI replies, notes, the model's view."""

from __future__ import annotations

from services.session.models import ConversationState, StoredMessage
from services.session.visibility import for_model, visible


def event(seq: int, content: str, *, kind: str = "message", role: str = "user", version: int = 0,
          state_version: int = 0) -> StoredMessage:
    state = ConversationState(status="human", version=state_version) if kind == "state" else None
    return StoredMessage(id=f"{seq:032x}", role=role, content=content, created_at=float(seq), tokens=1, seq=seq,
                         kind=kind, state=state, version=version)


LOG = [
    event(1, "question"),
    event(2, "answer v1", role="assistant", version=1),
    event(3, "status: waiting_human (visitor)", kind="state", role="system", state_version=2),
    event(4, "late answer v1", role="assistant", version=1),
    event(5, "staff only", kind="note", role="agent"),
    event(6, "answer v2", role="assistant", version=2),
    event(7, "status: human (claim)", kind="state", role="system", state_version=3),
    event(8, "unconditional", role="assistant"),
]


def test_visibility_void_replies_and_notes() -> None:
    assert [m.seq for m in visible(LOG, staff=True)] == [1, 2, 3, 5, 6, 7, 8]
    assert [m.seq for m in visible(LOG, staff=False)] == [1, 2, 3, 6, 7, 8]


def test_visibility_the_model_gets_said_messages_only() -> None:
    assert [m.content for m in for_model(LOG)] == ["question", "answer v1", "answer v2", "unconditional"]
