"""Where a conversation's log lives in JetStream: shared by its writer and its readers.

The session service alone appends to the log, after its access and state checks. The edges
follow it (one consumer per edge process on the whole log, gateway/live/log_tail.py) to fan stored events out
to their sockets, and resume replays it. The record format is the session's
(services/session/models.py, StoredMessage.to_json); gateway/live/log.py decodes it, and a
test holds the two together.
"""

from __future__ import annotations

LOG_STREAM = "KEFU_MESSAGES"
LOG_SUBJECT_PREFIX = "kefu.msg"


def log_subject(tenant: str, conversation_id: str) -> str:
    """One subject per conversation: its events in the order JetStream acknowledged them."""
    return f"{LOG_SUBJECT_PREFIX}.{tenant}.{conversation_id}"
