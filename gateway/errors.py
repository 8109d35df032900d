"""API errors, their HTTP status and JSON shape, and the mapping from gRPC status codes."""

from __future__ import annotations

import grpc

from services.common.errors import KefuError


class ApiError(KefuError):
    """An error the client sees as `{"error": {"code", "message", "request_id"}}`."""

    status = 500

    def __init__(self, code: str, message: str, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BodyTooLarge(ApiError):
    status = 413

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__("body_too_large", f"request body is larger than {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidJson(ApiError):
    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__("invalid_json", f"body is not UTF-8 JSON: {detail}")


class InvalidRequest(ApiError):
    status = 422

    def __init__(self, message: str) -> None:
        super().__init__("invalid_request", message)


class Unauthorized(ApiError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__("unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="kefu"'})


class Forbidden(ApiError):
    status = 403

    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message)


class ContentBlocked(ApiError):
    status = 400

    def __init__(self) -> None:
        super().__init__("content_blocked", "the message contains blocked content")


# gRPC status of a backend call -> (HTTP status, error code) for a client, by backend.
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.INVALID_ARGUMENT: (422, "invalid_request"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "forbidden"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthorized"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limited"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.UNKNOWN: (502, "upstream_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (502, "upstream_error"),
}


# The session service names which limit refused a message (trailing metadata `kefu-error`).
_LIMITS: dict[str, tuple[int, str]] = {
    "rate_limited": (429, "rate_limited"),
    "quota_exceeded": (409, "quota_exceeded"),
    "storage_full": (507, "storage_full"),
}
LIMIT_CODES = frozenset(name for _, name in _LIMITS.values())
"""Error codes of the limits a visitor or tenant hit; the WebSocket nacks them as `limit`."""


def _trailer(error: grpc.aio.AioRpcError, key: str) -> str:
    for name, value in error.trailing_metadata() or ():
        if name == key and isinstance(value, str):
            return value
    return ""


def api_error_from_grpc(error: grpc.aio.AioRpcError, backend: str) -> ApiError:
    """`backend` names the service ("session", "moderation", "llm") so 503s say which one is down."""
    code = error.code()
    status, name = _GRPC_TO_HTTP.get(code, (500, "internal"))
    headers: dict[str, str] = {}
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        limit = _trailer(error, "kefu-error")
        headers["Retry-After"] = _trailer(error, "retry-after") or "1"
        if backend == "llm":
            name = "upstream_rate_limited"  # the model's provider refused: our client did nothing wrong
        elif limit in _LIMITS:  # the session service's limits (issue 17)
            status, name = _LIMITS[limit]
            if limit != "rate_limited":
                del headers["Retry-After"]  # waiting a second does not free a quota
    if code is grpc.StatusCode.UNAVAILABLE:
        name = "upstream_unavailable" if backend == "llm" else f"{backend}_unavailable"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        if backend == "llm":
            name = "upstream_timeout"
        else:
            # A session or moderation call that cannot finish in seconds is as good as down
            # (gRPC's own retries against a dead backend end here too).
            status, name = 503, f"{backend}_unavailable"
    message = error.details() or name
    if status >= 500 and code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.FAILED_PRECONDITION):
        message = f"{backend} service: {message}"
    if status == 500:
        message = "internal error"  # never leak a backend's internals
    return ApiError(name, message, status, headers=headers)


# -- live chat (gateway/live): the same codes, told as an `error` frame, a `nack` or a close ----------

# Frame errors, refusals and socket closes have no HTTP status of their own (docs/api.md: "—").

class FrameError(ApiError):
    """A bad client frame (invalid_json, unknown_type, invalid_frame): an `error` frame and one strike."""


class Refused(ApiError):
    """A request the edge will not do: the socket gets one `nack` with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


class NotYours(ApiError):
    """The conversation does not exist or is not the principal's (a visitor's socket closes 4003, an
    agent gets `nack` forbidden)."""

    status = 403

    def __init__(self, conversation_id: str) -> None:
        super().__init__("forbidden", "not your conversation")
        self.conversation_id = conversation_id


class FeedUnavailable(ApiError):
    """The session service could not be asked for a conversation's log (close 1011 at hello, else `nack`)."""

    status = 503

    def __init__(self, detail: str) -> None:
        super().__init__("unavailable", detail)


class SocketRefused(ApiError):
    """A refusal that ends the socket: an `error` frame with the code, then the close code."""

    def __init__(self, close_code: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.close_code = close_code
