"""The gRPC status each refusal of the session service ends a call with (a unary RPC or a streamed call)."""

from __future__ import annotations

import logging

import grpc
from nats.errors import Error as NatsError

from services.common.call_streams import CallStatus
from services.common.errors import KefuError
from services.common.grpc_server import status_for
from services.session.errors import Conflict, QuotaExceeded, RateLimited, StorageFull, WrongStatus

log = logging.getLogger(__name__)
ERROR_HEADER = "kefu-error"
"""Trailing metadata naming which limit a RESOURCE_EXHAUSTED is: rate_limited, quota_exceeded or storage_full."""
RETRY_AFTER_HEADER = "retry-after"

REFUSALS = (KefuError, NatsError, TimeoutError)
"""What status_of maps; anything else is a bug, left to the caller's catch-all."""


def status_of(error: KefuError | NatsError | TimeoutError) -> CallStatus:
    """The status, message and trailers a call that raised `error` ends with."""
    match error:
        case Conflict():
            return CallStatus(grpc.StatusCode.ABORTED, error.message)
        case WrongStatus():
            return CallStatus(grpc.StatusCode.FAILED_PRECONDITION, error.message)
        case RateLimited():
            return CallStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, error.message, (
                (ERROR_HEADER, error.code), (RETRY_AFTER_HEADER, str(error.retry_after_s))))
        case QuotaExceeded() | StorageFull():
            return CallStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, error.message, ((ERROR_HEADER, error.code),))
    # services.common.grpc_server.grpc_errors' mapping, with its logging.
    code = status_for(error)
    message = error.message if isinstance(error, KefuError) else f"backend unavailable: {type(error).__name__}"
    if code is grpc.StatusCode.UNAVAILABLE:
        log.warning("%s: %s", type(error).__name__, error)
    elif code is grpc.StatusCode.INTERNAL:  # a KefuError with no status of its own is a bug: say where
        log.error("%s: %s", type(error).__name__, error, exc_info=error)
    return CallStatus(code, message)
