"""Which events of a conversation log a reader gets (pure): void AI replies, notes, the model's view."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.session.models import StoredMessage


@dataclass(slots=True)
class LogFilter:
    """Feed it a conversation's log in order; it says which events this reader may see.

    An AI reply is appended with the state version it was generated under. When a `state`
    event with a newer version precedes it in the log (an agent claimed while the answer was
    being written), the reply is void: nobody gets it. Notes are for staff only.
    """

    staff: bool
    version: int = 0
    """Newest state version seen so far in the log."""

    def admit(self, message: StoredMessage) -> bool:
        if message.kind == "state":
            if message.state is not None:
                self.version = max(self.version, message.state.version)
            return True
        if message.version and message.version < self.version:
            return False
        return self.staff or message.kind != "note"


def visible(history: Iterable[StoredMessage], staff: bool) -> list[StoredMessage]:
    """The events of a whole log (oldest first) a reader may see."""
    log_filter = LogFilter(staff)
    return [m for m in history if log_filter.admit(m)]


def for_model(history: Iterable[StoredMessage]) -> list[StoredMessage]:
    """What the model is given: said messages only, no notes, no state events, no void replies."""
    return [m for m in visible(history, staff=False) if m.kind == "message"]
