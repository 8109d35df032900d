"""Session metadata written by name (not dataclasses.asdict): every field, set away from its default,
comes back from its JSON, so a field added to the dataclass and forgotten in to_json fails here."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from services.session.models import AnswerOwed, ConversationState, SessionMeta


def non_default(cls: type[Any]) -> dict[str, Any]:
    """A value for every field of `cls` that no default has."""
    values: dict[str, Any] = {}
    for number, item in enumerate(dataclasses.fields(cls), start=1):
        kind = str(item.type)
        if "ConversationState" in kind:
            values[item.name] = ConversationState(**non_default(ConversationState))
        elif "AnswerOwed" in kind:
            values[item.name] = AnswerOwed(**non_default(AnswerOwed))
        elif kind == "int":
            values[item.name] = 100 + number
        elif kind == "float":
            values[item.name] = 1_700_000_000.5 + number
        else:
            values[item.name] = f"{item.name}-值"
    return values


def test_session_metadata_keeps_every_field_through_its_json() -> None:
    meta = SessionMeta(**non_default(SessionMeta))
    assert set(json.loads(meta.to_json())) == {item.name for item in dataclasses.fields(SessionMeta)}
    assert SessionMeta.from_json(meta.to_json()) == meta
    assert ConversationState.from_dict(meta.state.to_dict()) == meta.state


def test_session_metadata_without_an_owed_answer_writes_no_owed_key() -> None:
    meta = SessionMeta("t", "alice", 1.0, 2.0)
    assert "owed" not in json.loads(meta.to_json())
    assert SessionMeta.from_json(meta.to_json()) == meta
