"""gRPC wiring of the moderation service: protobuf <-> domain, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

import grpc
from grpc_health.v1 import health

from kefu.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from services.common.call_streams import serve_calls
from services.common.errors import InvalidArgument
from services.common.grpc_server import (
    add_health_and_reflection,
    bind,
    create_grpc_server,
    stop_gracefully,
    wait_for_stop_signal,
)
from services.common.lexicon.matcher import Hit
from services.common.lexicon.model import Action
from services.common.lexicon.stream_filter import StreamFilter
from services.common.metrics import start_metrics_server
from services.common.nats_client import NatsEndpoint, check_credentials
from services.moderation.check_many import check_many_spec
from services.moderation.lexicon import LexiconError
from services.moderation.metrics import ModerationMetrics
from services.moderation.publish import publish_forever
from services.moderation.reload import LexiconReloader
from services.moderation.settings import ModerationSettings

log = logging.getLogger(__name__)
SERVICE_NAME = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"].full_name

VERDICTS = {
    Action.ALLOW: moderation_pb2.VERDICT_ALLOW,
    Action.MASK: moderation_pb2.VERDICT_MASK,
    Action.REVIEW: moderation_pb2.VERDICT_REVIEW,
    Action.BLOCK: moderation_pb2.VERDICT_BLOCK,
}


def hits_to_proto(hits: Iterable[Hit]) -> list[moderation_pb2.Hit]:
    return [moderation_pb2.Hit(category=h.category, word=h.word, start=h.start, end=h.end,
                               action=h.action.name.lower()) for h in hits]


class ModerationServicer(moderation_pb2_grpc.ModerationServiceServicer):
    def __init__(self, settings: ModerationSettings, lexicon: LexiconReloader, metrics: ModerationMetrics) -> None:
        self._settings = settings
        self._lexicon = lexicon
        self._metrics = metrics
        # Bound once: labels() costs a lock and a dict lookup per call on the hot path.
        self._unary_seconds = metrics.check_seconds.labels("unary")
        self._stream_seconds = metrics.check_seconds.labels("stream")
        self._checks = {action: metrics.checks.labels(action.name.lower()) for action in Action}
        self._check_many = check_many_spec(self.check)
        self._draining = asyncio.Event()
        """Set when the server stops: each CheckMany stream ends once its checks in flight finished."""

    def _count_hits(self, hits: Iterable[Hit]) -> None:
        for hit in hits:
            self._metrics.hits.labels(hit.category, hit.action.name.lower()).inc()

    async def Check(
        self, request: moderation_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[moderation_pb2.CheckRequest, moderation_pb2.CheckResponse],
    ) -> moderation_pb2.CheckResponse:
        try:
            return self.check(request)
        except InvalidArgument as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

    async def CheckMany(
        self, requests: AsyncIterator[moderation_pb2.CheckBatch],
        context: grpc.aio.ServicerContext[moderation_pb2.CheckBatch, moderation_pb2.CheckResults],
    ) -> AsyncIterator[moderation_pb2.CheckResults]:
        """Check multiplexed (services.moderation.check_many): each item as the unary Check."""
        async for batch in serve_calls(self._check_many, requests, self._draining):
            yield batch

    def drain(self) -> None:
        """The server stops: CheckMany streams finish what they run and end (callers reopen elsewhere)."""
        self._draining.set()

    def check(self, request: moderation_pb2.CheckRequest) -> moderation_pb2.CheckResponse:
        """Check's work, for the unary RPC and the call stream alike; InvalidArgument for a text too long."""
        if len(request.text) > self._settings.max_text_chars:
            raise InvalidArgument(f"text is longer than {self._settings.max_text_chars} characters")
        start = time.perf_counter()
        # The matcher in use right now; a reload swaps it for the next call, never mid-check.
        result = self._lexicon.matcher.check(request.text)
        self._unary_seconds.observe(time.perf_counter() - start)
        self._checks[result.verdict].inc()
        self._count_hits(result.hits)
        return moderation_pb2.CheckResponse(verdict=VERDICTS[result.verdict], masked_text=result.masked_text,
                                            hits=hits_to_proto(result.hits))

    async def CheckStream(
        self, requests: AsyncIterator[moderation_pb2.CheckStreamRequest],
        context: grpc.aio.ServicerContext[moderation_pb2.CheckStreamRequest, moderation_pb2.CheckStreamResponse],
    ) -> AsyncIterator[moderation_pb2.CheckStreamResponse]:
        # One matcher for the whole stream, so a reload mid-stream cannot change the rules half-way.
        stream = StreamFilter(self._lexicon.matcher)
        verdict = Action.ALLOW
        async for request in requests:
            start = time.perf_counter()
            step = stream.feed(request.delta, final=request.final)
            self._stream_seconds.observe(time.perf_counter() - start)
            if stream.held_chars > self._settings.max_text_chars:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "held-back text grew beyond the limit")
            if step.blocked is not None:
                self._count_hits([step.blocked])
                self._checks[Action.BLOCK].inc()
                yield moderation_pb2.CheckStreamResponse(verdict=moderation_pb2.VERDICT_BLOCK,
                                                         hits=hits_to_proto([step.blocked]))
                return
            self._count_hits(step.hits)
            verdict = max(verdict, max((h.action for h in step.hits), default=Action.ALLOW))
            yield moderation_pb2.CheckStreamResponse(safe_delta=step.safe_text, verdict=VERDICTS[verdict],
                                                     hits=hits_to_proto(step.hits))
            if request.final:
                break
        self._checks[verdict].inc()


async def create_server(settings: ModerationSettings, servicer: ModerationServicer,
                        metrics: ModerationMetrics) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Build the server with health and reflection and bind it; do not start."""
    server = create_grpc_server(metrics.registry, settings.internal_token)
    moderation_pb2_grpc.add_ModerationServiceServicer_to_server(servicer, server)
    health_servicer = await add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, settings.host, settings.grpc_port)
    return server, health_servicer, port


async def serve(settings: ModerationSettings) -> None:
    metrics = ModerationMetrics()
    try:
        lexicon = LexiconReloader.load(settings.lexicon_dir, metrics)
    except LexiconError as error:
        raise SystemExit(f"moderation: KEFU_LEXICON_DIR: {error}") from None
    metrics_server = start_metrics_server(metrics.registry, settings.metrics_port, settings.host)
    # A wrong NATS password stops the process at start (one line); an unreachable NATS does not: input
    # checks go on, and the publisher keeps trying.
    await check_credentials(NatsEndpoint.parse(settings.nats_url))
    stop_watching = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    publisher = asyncio.create_task(
        publish_forever(settings.nats_url, settings.nats_replicas, lexicon, metrics, stop_watching),
        name="lexicon-publisher")
    try:
        servicer = ModerationServicer(settings, lexicon, metrics)
        server, health_servicer, port = await create_server(settings, servicer, metrics)
        if settings.lexicon_watch:
            watcher = asyncio.create_task(lexicon.watch(
                stop_watching, quiet_ms=settings.lexicon_quiet_ms, debounce_ms=settings.lexicon_debounce_ms))
        await server.start()
        log.info("moderation service on %s:%d, %d words from %s%s", settings.host, port,
                 lexicon.matcher.word_count, settings.lexicon_dir, " (watched)" if watcher else "")
        await wait_for_stop_signal()
        servicer.drain()
        await stop_gracefully(server, health_servicer, settings.grace_s)
    finally:
        stop_watching.set()
        if watcher is not None:
            await watcher
        await _stopped(publisher)
        metrics_server.close()


async def _stopped(publisher: asyncio.Task[None]) -> None:
    """The publisher ends by itself once stopped; one still connecting to an unreachable NATS is cancelled."""
    done, _ = await asyncio.wait([publisher], timeout=5)
    if not done:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
    elif not publisher.cancelled() and (error := publisher.exception()) is not None:
        log.error("the lexicon publisher failed: %s", error)
