"""The error tree shared by every process: domain errors that carry their data."""

from __future__ import annotations


class KefuError(Exception):
    """Base of every error kefu raises on purpose."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(KefuError, LookupError):
    code = "not_found"


class InvalidArgument(KefuError, ValueError):
    code = "invalid_request"


class PermissionDenied(KefuError, PermissionError):
    code = "forbidden"


class Unavailable(KefuError, ConnectionError):
    code = "unavailable"


class UpstreamError(KefuError):
    """The upstream model failed; `status` is its HTTP status when it answered."""

    code = "upstream_error"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTimeout(UpstreamError, TimeoutError):
    code = "upstream_timeout"
