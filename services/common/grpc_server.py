"""gRPC server bootstrap shared by the services: health, reflection, request ids, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.errors import Error as NatsError
from prometheus_client import CollectorRegistry, Histogram

from services.common.errors import (
    InvalidArgument,
    KefuError,
    NotFound,
    PermissionDenied,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from services.common.logs import REQUEST_ID_METADATA_KEY, request_id_var
from services.common.settings import internal_tokens

log = logging.getLogger(__name__)

DEFAULT_MAX_RECEIVE_BYTES = 8 * 1024 * 1024
SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    # Without this a second server can bind the same port and silently take calls.
    ("grpc.so_reuseport", 0),
    # Long streams: allow client keepalive pings every 20 s without a call in flight.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", DEFAULT_MAX_RECEIVE_BYTES),
    # Clients reconnect every few minutes, so DNS round robin finds pods added by a scale-up;
    # streams open at that moment get a long grace to finish.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
)


AUTHORIZATION_METADATA_KEY = "authorization"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
"""Calls answered without the internal credential: Kubernetes `grpc:` probes carry none."""
DENIED_LOG_INTERVAL_S = 10.0

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

if TYPE_CHECKING:  # generic only in types-grpcio: at run time these classes take no type arguments
    # A handler or context serves whichever method the call names: its protobuf types are unknown here.
    _AnyHandler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _AnyContext: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    # types-grpcio types RpcMethodHandler's behaviours as the sync server's (plain functions over Iterators);
    # under grpc.aio they are coroutine functions and async generator functions.
    _Answering: TypeAlias = Callable[[Any, _AnyContext], Awaitable[object]]
    _Streaming: TypeAlias = Callable[[Any, _AnyContext], AsyncIterator[object]]


class InternalAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health must carry `authorization: Bearer <KEFU_INTERNAL_TOKEN>`; else UNAUTHENTICATED.

    The services trust the principal their caller names, so only kefu's own processes may call them:
    the network alone is not a boundary (any pod of the cluster could)."""

    def __init__(self, token: str) -> None:
        tokens = internal_tokens(token)
        if not tokens:
            raise ValueError("an internal token is required")
        # Compared as digests: equal lengths, so compare_digest leaks nothing about the token's length.
        self._expected = tuple(hashlib.sha256(f"Bearer {t}".encode()).digest() for t in tokens)
        self._last_denied_log = -DENIED_LOG_INTERVAL_S
        self._denied_since_log = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        if details.method.startswith(OPEN_METHOD_PREFIXES) or self._authorized(details):
            return await continuation(details)
        self._log_denied(details.method)
        handler = await continuation(details)
        return _denying(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == AUTHORIZATION_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else bytes(value)
                digest = hashlib.sha256(presented).digest()
                # Every accepted token is compared, so the time taken does not say which one matched.
                return sum(hmac.compare_digest(digest, expected) for expected in self._expected) > 0
        return False

    def _log_denied(self, method: str) -> None:
        # A stranger hammering the port must not flood the log: one line per interval, with a count.
        self._denied_since_log += 1
        now = time.monotonic()
        if now - self._last_denied_log >= DENIED_LOG_INTERVAL_S:
            log.warning("refused %d gRPC call(s) without a valid internal credential (last: %s)",
                        self._denied_since_log, method)
            self._last_denied_log, self._denied_since_log = now, 0


_DENIED = "missing or wrong internal credential (authorization: Bearer <KEFU_INTERNAL_TOKEN>)"
DENY_FIRST_MESSAGE_WAIT_S = 1.0


def _denying(handler: grpc.RpcMethodHandler[RequestT, ResponseT] | None) -> grpc.RpcMethodHandler[RequestT, ResponseT]:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without running anything."""

    async def deny(context: _AnyContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def unary(request: object, context: _AnyContext) -> None:
        await deny(context)

    async def streaming(request: object, context: _AnyContext) -> AsyncIterator[None]:
        await deny(context)
        yield None  # never reached: abort raises

    async def after_first(requests: AsyncIterator[object], context: _AnyContext) -> None:
        # A caller that writes before it reads would see its write race the early status, and grpc.aio's
        # client then reports INTERNAL instead of UNAUTHENTICATED (grpc/grpc#36066): let the first
        # message arrive (briefly) before refusing.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(anext(aiter(requests)), DENY_FIRST_MESSAGE_WAIT_S)
        await deny(context)

    async def unary_after_first(requests: AsyncIterator[object], context: _AnyContext) -> None:
        await after_first(requests, context)

    async def streaming_after_first(requests: AsyncIterator[object],
                                    context: _AnyContext) -> AsyncIterator[None]:
        await after_first(requests, context)
        yield None  # never reached: abort raises

    if handler is None or handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_after_first)
    return grpc.stream_stream_rpc_method_handler(streaming_after_first)


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Puts the caller's request id into the logging context and times every call by service, method and code.

    A method's handler is wrapped once and its labels bound then (issue 20): a call costs a dictionary
    lookup here, and the wrapper reads the request id from the call's own metadata."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._duration = Histogram(
            "kefu_grpc_server_handling_seconds", "Time to handle a gRPC call (streams: until the last message).",
            ["service", "method", "code"], registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self._wrapped: dict[str, tuple[_AnyHandler, _AnyHandler]] = {}
        """By full method name: the handler the server gave and its wrapper (bounded: only served
        methods get a handler)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        handler = await continuation(details)
        if handler is None:
            return handler  # an unknown method: gRPC answers UNIMPLEMENTED, and no label takes a caller's string
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        # "/kefu.moderation.v1.ModerationService/Check": the service's full name tells it from health's Check.
        service, _, method = details.method.lstrip("/").rpartition("/")
        wrapped = _wrap(handler, _CallTimer(self._duration, service, method))
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped


def _request_id(context: _AnyContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA_KEY:
            return str(value)
    return ""


class _CallTimer:
    """Times the calls of one method and records each under its outcome's status code."""

    __slots__ = ("_by_code", "_histogram", "method", "service")

    def __init__(self, histogram: Histogram, service: str, method: str) -> None:
        self._histogram = histogram
        self.service = service
        self.method = method
        self._by_code: dict[grpc.StatusCode, Histogram] = {}
        """The histogram's child per status code, bound on first use (at most the 17 codes)."""

    @contextmanager
    def timed(self, context: _AnyContext) -> Iterator[None]:
        # Each RPC runs in its own task, so setting the context variable scopes it to the call.
        request_id_var.set(_request_id(context))
        log.debug("rpc %s/%s", self.service, self.method)
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as raised:  # observed, then re-raised untouched: cancellation included
            error = raised
            raise
        finally:
            code = call_status(context, error)
            child = self._by_code.get(code)
            if child is None:
                child = self._by_code[code] = self._histogram.labels(self.service, self.method, code.name)
            child.observe(time.perf_counter() - start)


def call_status(context: grpc.aio.ServicerContext[RequestT, ResponseT],
                error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with, as its client sees it."""
    code: grpc.StatusCode | None = context.code()  # set by abort() and set_code()
    if code is not None:
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # grpc.aio cancels the handler both when the client goes away and when the deadline passes.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what grpc.aio answers for an exception the handler let escape


def _wrap(handler: _AnyHandler, timer: _CallTimer) -> _AnyHandler:
    codec = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_answering(cast("_Answering", handler.unary_unary), timer), *codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_streaming(cast("_Streaming", handler.unary_stream), timer), *codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_answering(cast("_Answering", handler.stream_unary), timer), *codec)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(cast("_Streaming", handler.stream_stream), timer), *codec)
    return handler


def _answering(inner: _Answering, timer: _CallTimer) -> _Answering:
    """A handler with one response (its request: one message or a stream), timed."""

    async def handle(request: object, context: _AnyContext) -> object:
        with timer.timed(context):
            return await inner(request, context)

    return handle


def _streaming(inner: _Streaming, timer: _CallTimer) -> _Streaming:
    """A handler with a response stream, timed until its last message."""

    async def handle(request: object, context: _AnyContext) -> AsyncIterator[object]:
        with timer.timed(context):
            async for item in inner(request, context):
                yield item

    return handle


def create_grpc_server(registry: CollectorRegistry, internal_token: str, *,
                       max_receive_bytes: int | None = None) -> grpc.aio.Server:
    """A grpc.aio server with kefu's options and interceptors; services are added by the caller.

    With an `internal_token` every call but health needs it (InternalAuthInterceptor); "" serves
    anyone (KEFU_INTERNAL_AUTH=off, and servers built in-process by unit tests).
    `max_receive_bytes`: a larger request limit (the worker receives whole documents); never lowers it."""
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestContextInterceptor(registry)]
    if internal_token:
        interceptors.insert(0, InternalAuthInterceptor(internal_token))
    else:
        log.warning("internal gRPC authentication is off: anyone who reaches this port may call it")
    options = list(SERVER_OPTIONS)
    if max_receive_bytes is not None and max_receive_bytes > DEFAULT_MAX_RECEIVE_BYTES:
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    return grpc.aio.server(interceptors=interceptors, options=options)


LIVENESS_SERVICE = "liveness"
"""The health service name that stays SERVING while the process runs (Kubernetes' liveness and startup
probes): "" and the services' own names follow readiness (a worker without a lexicon is alive, not ready)."""


async def add_health_and_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (every service SERVING, and LIVENESS_SERVICE) and reflection."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", LIVENESS_SERVICE, *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return health_servicer


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind an insecure port and return the bound one (port 0 picks a free one)."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind gRPC port {host}:{port}")
    return bound


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT; a second one is ignored (shutdown is idempotent)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stop signal received")


async def stop_gracefully(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                          grace_s: float) -> None:
    """Report NOT_SERVING, let calls in flight finish for up to `grace_s`, then stop."""
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)


_STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (UpstreamTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (UpstreamError, grpc.StatusCode.UNAVAILABLE),
    (NatsError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: Exception) -> grpc.StatusCode:
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


@asynccontextmanager
async def grpc_errors(context: grpc.aio.ServicerContext[RequestT, ResponseT]) -> AsyncIterator[None]:
    """Turn domain and NATS errors into a gRPC status; anything else is INTERNAL, logged once."""
    try:
        yield
    except (KefuError, NatsError, TimeoutError) as error:
        code = status_for(error)
        message = error.message if isinstance(error, KefuError) else f"backend unavailable: {type(error).__name__}"
        if code is grpc.StatusCode.UNAVAILABLE:
            log.warning("%s: %s", type(error).__name__, error)
        elif code is grpc.StatusCode.INTERNAL:  # a KefuError with no status of its own is a bug: say where
            log.error("%s: %s", type(error).__name__, error, exc_info=error)
        await context.abort(code, message)
