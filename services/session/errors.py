"""Refusals of conversation changes that services.common.errors has no class for (mapped in server.py)."""

from __future__ import annotations

from services.common.errors import KefuError


class Conflict(KefuError):
    """Another change won (gRPC ABORTED): a lost claim race, a stale `expected_version` or `if_version`."""

    code = "conflict"

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version
        """The conversation's state version the request lost against."""


class WrongStatus(KefuError):
    """The action is not allowed from the conversation's current status (gRPC FAILED_PRECONDITION)."""

    code = "wrong_status"

    def __init__(self, action: str, status: str) -> None:
        super().__init__(f"cannot {action} a conversation in status {status}")
        self.action = action
        self.status = status


class RateLimited(KefuError):
    """A visitor sends messages faster than KEFU_VISITOR_MSG_RPS / _BURST allow (RESOURCE_EXHAUSTED)."""

    code = "rate_limited"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many messages; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QuotaExceeded(KefuError):
    """A tenant's stored messages reached KEFU_TENANT_MAX_STORED_BYTES, or a visitor its open
    conversations (RESOURCE_EXHAUSTED); nothing was stored."""

    code = "quota_exceeded"


class StorageFull(KefuError):
    """The conversation log reached KEFU_MESSAGES_MAX_BYTES and refuses new messages (RESOURCE_EXHAUSTED)."""

    code = "storage_full"
