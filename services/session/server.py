"""gRPC wiring of the session service: protobuf <-> domain, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.call_streams import serve_calls
from services.common.grpc_server import (
    add_health_and_reflection,
    bind,
    create_grpc_server,
    stop_gracefully,
    wait_for_stop_signal,
)
from services.common.metrics import start_metrics_server
from services.common.nats_client import close_nats, connect_nats
from services.session.backfill import arm_stored
from services.session.calls import call_stream_spec
from services.session.context import build_context
from services.session.conversation import Change
from services.session.errors import QuotaExceeded, RateLimited, StorageFull
from services.session.index import ConversationSummary
from services.session.limits import TenantUsage, VisitorRates
from services.session.listing import list_conversations
from services.session.metrics import SessionMetrics
from services.session.models import Citation, ConversationState, Principal, StoredMessage
from services.session.schedule import TimerLimits, TimerSchedule
from services.session.settings import SessionSettings
from services.session.statuses import REFUSALS, status_of
from services.session.store import Admit, AppendResult, SessionStore, TransitionResult
from services.session.timers import ConversationTimers
from services.session.tokens import TokenCounters
from services.session.visibility import for_model

log = logging.getLogger(__name__)
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
INTEGRATOR_PREFIX = "api:"
SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name


def principal_of(request: session_pb2.AppendRequest | session_pb2.BeginTurnRequest
                 | session_pb2.BuildContextRequest
                 | session_pb2.ListMessagesRequest | session_pb2.DeleteSessionRequest
                 | session_pb2.TransitionRequest
                 | session_pb2.ListConversationsRequest | session_pb2.ClaimAnswerRequest) -> Principal:
    p = request.principal
    return Principal(tenant=p.tenant, subject=p.subject, role=p.role)


def is_anonymous_visitor(principal: Principal) -> bool:
    """A widget visitor: `api` integrators come as visitors under `api:` subjects (gateway.auth's
    session_caller) and are held by the edge's per-principal limits instead."""
    return principal.role == "visitor" and not principal.subject.startswith(INTEGRATOR_PREFIX)


def state_to_proto(state: ConversationState) -> session_pb2.ConversationState:
    return session_pb2.ConversationState(status=state.status, version=state.version, assignee=state.assignee,
                                         assignee_name=state.assignee_name, reason=state.reason, since=state.since)


def to_proto(message: StoredMessage) -> session_pb2.Message:
    proto = session_pb2.Message(id=message.id, role=message.role, content=message.content,
                                created_at=message.created_at, tokens=message.tokens, seq=message.seq,
                                kind=message.kind, sender_id=message.sender_id, sender_name=message.sender_name,
                                version=message.version,
                                citations=[session_pb2.Citation(**c.to_dict()) for c in message.citations])
    if message.state is not None:
        proto.state.CopyFrom(state_to_proto(message.state))
    return proto


def append_response(result: AppendResult) -> session_pb2.AppendResponse:
    return session_pb2.AppendResponse(session_id=result.session_id, message=to_proto(result.message),
                                      created=result.created, duplicate=result.duplicate,
                                      state=state_to_proto(result.state))


def citation_of(proto: session_pb2.Citation) -> Citation:
    return Citation(document_id=proto.document_id, title=proto.title, url=proto.url, chunk_id=proto.chunk_id,
                    quote=proto.quote)


def summary_to_proto(summary: ConversationSummary) -> session_pb2.ConversationSummary:
    return session_pb2.ConversationSummary(session_id=summary.session_id, owner=summary.owner,
                                           state=state_to_proto(summary.state), created_at=summary.created_at,
                                           updated_at=summary.updated_at, preview=summary.preview)


@contextlib.asynccontextmanager
async def session_errors(context: grpc.aio.ServicerContext[RequestT, ResponseT]) -> AsyncIterator[None]:
    """A refusal (services.session.statuses) ends the call with its status; anything else is a bug."""
    try:
        yield
    except REFUSALS as error:
        status = status_of(error)
        await context.abort(status.code, status.message, trailing_metadata=status.trailers)


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, settings: SessionSettings, store: SessionStore, counters: TokenCounters,
                 metrics: SessionMetrics, rates: VisitorRates | None = None) -> None:
        self._settings = settings
        self._store = store
        self._rates = rates
        """Messages per visitor over every edge and replica (None: no limit, as in store-level tests)."""
        self._counters = counters
        self._metrics = metrics
        self._calls = call_stream_spec(self.begin_turn, self.append)
        self._draining = asyncio.Event()
        """Set when the server stops: each Calls stream ends once its calls in flight finished."""

    async def Append(
            self, request: session_pb2.AppendRequest,
            context: grpc.aio.ServicerContext[session_pb2.AppendRequest, session_pb2.AppendResponse],
    ) -> session_pb2.AppendResponse:
        async with session_errors(context):
            return await self.append(request)

    async def BeginTurn(
            self, request: session_pb2.BeginTurnRequest,
            context: grpc.aio.ServicerContext[session_pb2.BeginTurnRequest, session_pb2.BeginTurnResponse],
    ) -> session_pb2.BeginTurnResponse:
        async with session_errors(context):
            return await self.begin_turn(request)

    async def Calls(
            self, requests: AsyncIterator[session_pb2.SessionCallBatch],
            context: grpc.aio.ServicerContext[session_pb2.SessionCallBatch, session_pb2.SessionResultBatch],
    ) -> AsyncIterator[session_pb2.SessionResultBatch]:
        """BeginTurn and Append multiplexed (services.session.calls): each call as its unary RPC."""
        async for batch in serve_calls(self._calls, requests, self._draining):
            yield batch

    def drain(self) -> None:
        """The server stops: Calls streams finish what they run and end (callers reopen elsewhere)."""
        self._draining.set()

    async def append(self, request: session_pb2.AppendRequest) -> session_pb2.AppendResponse:
        """Append's work, for the unary RPC and the call stream alike; raises the refusals of statuses.py."""
        with self._metrics.operation_seconds.labels("append").time():
            result = await self._append(principal_of(request), request.role, lambda principal, admit: (
                self._store.append(
                    principal, request.session_id, request.role, request.content, request.message_id,
                    kind=request.kind, sender_name=request.sender_name, if_version=request.if_version,
                    after_seq=request.after_seq, citations=[citation_of(c) for c in request.citations], admit=admit)))
        return append_response(result)

    async def begin_turn(self, request: session_pb2.BeginTurnRequest) -> session_pb2.BeginTurnResponse:
        """Append's store of the visitor's message, then BuildContext's context from the history the
        append read beside its state check (none for a new conversation). For both paths, as append()."""
        with self._metrics.operation_seconds.labels("begin_turn").time():
            result = await self._append(principal_of(request), "user", lambda principal, admit: (
                self._store.append(principal, request.session_id, "user", request.content, request.message_id,
                                   with_history=not request.store_only, admit=admit)))
            response = session_pb2.BeginTurnResponse(stored=append_response(result))
            if request.store_only or result.history is None or result.state.status != "ai":
                return response
            counter = await self._counters.for_model(request.model)
            budget = request.max_tokens if request.max_tokens > 0 else self._settings.default_context_tokens
            built = build_context(for_model(result.history), request.system_prompt, budget, counter)
        self._metrics.context_tokens.labels(counter.name).observe(built.total_tokens)
        response.context.CopyFrom(session_pb2.BuildContextResponse(
            messages=[to_proto(m) for m in built.messages], total_tokens=built.total_tokens,
            truncated=built.truncated, user_message_count=result.user_message_count))
        return response

    async def _append(self, principal: Principal, role: str,
                      store: Callable[[Principal, Admit | None], Awaitable[AppendResult]]) -> AppendResult:
        """A visitor's message takes a token of its rate (the store takes it beside its own checks,
        before it stores anything); refusals are counted."""
        admit: Admit | None = None
        if self._rates is not None and is_anonymous_visitor(principal) and role == "user":
            admit = functools.partial(self._rates.take, principal.tenant, principal.subject)
        try:
            result = await store(principal, admit)
        except (RateLimited, QuotaExceeded, StorageFull) as refused:
            self._metrics.messages_refused.labels(refused.code).inc()
            raise
        if result.created:
            self._metrics.sessions_created.inc()
        if not result.duplicate:
            self._metrics.messages_appended.labels(result.message.role).inc()
        return result

    async def ClaimAnswer(
            self, request: session_pb2.ClaimAnswerRequest,
            context: grpc.aio.ServicerContext[session_pb2.ClaimAnswerRequest, session_pb2.ClaimAnswerResponse],
    ) -> session_pb2.ClaimAnswerResponse:
        async with session_errors(context):
            with self._metrics.operation_seconds.labels("claim_answer").time():
                claim = await self._store.claim_answer(principal_of(request), request.session_id, request.message_id,
                                                       request.holder, request.lease_s)
        self._metrics.answer_claims.labels(
            "granted" if claim.granted else "held" if claim.message_id else "none").inc()
        return session_pb2.ClaimAnswerResponse(granted=claim.granted, message_id=claim.message_id,
                                               held_for_s=claim.held_for_s, state=state_to_proto(claim.state))

    async def Transition(
            self, request: session_pb2.TransitionRequest,
            context: grpc.aio.ServicerContext[session_pb2.TransitionRequest, session_pb2.TransitionResponse],
    ) -> session_pb2.TransitionResponse:
        async with session_errors(context):
            with self._metrics.operation_seconds.labels("transition").time():
                change = Change(request.action, request.expected_version, request.assignee,
                                request.assignee_name, request.reason)
                result = await self._store.transition(principal_of(request), request.session_id, change)
        self._observe(result)
        response = session_pb2.TransitionResponse(state=state_to_proto(result.state), unchanged=result.unchanged)
        if result.event is not None:
            response.event.CopyFrom(to_proto(result.event))
        return response

    def _observe(self, result: TransitionResult) -> None:
        if result.unchanged:
            return
        if result.state.status == "waiting_human" and result.previous.status == "ai":
            self._metrics.handoffs.labels(result.state.reason).inc()
        if result.state.status == "human" and result.previous.status == "waiting_human":
            self._metrics.queue_wait_seconds.observe(max(0.0, time.time() - result.previous.since))

    async def ListConversations(
            self, request: session_pb2.ListConversationsRequest,
            context: grpc.aio.ServicerContext[session_pb2.ListConversationsRequest,
                                              session_pb2.ListConversationsResponse],
    ) -> session_pb2.ListConversationsResponse:
        async with session_errors(context):
            with self._metrics.operation_seconds.labels("list_conversations").time():
                summaries = await list_conversations(self._store, principal_of(request), request.status,
                                                     request.assignee, request.limit)
        return session_pb2.ListConversationsResponse(conversations=[summary_to_proto(s) for s in summaries])

    async def BuildContext(
            self, request: session_pb2.BuildContextRequest,
            context: grpc.aio.ServicerContext[session_pb2.BuildContextRequest, session_pb2.BuildContextResponse],
    ) -> session_pb2.BuildContextResponse:
        async with session_errors(context):
            with self._metrics.operation_seconds.labels("build_context").time():
                meta, history = await self._store.messages(principal_of(request), request.session_id)
                counter = await self._counters.for_model(request.model)
                budget = request.max_tokens if request.max_tokens > 0 else self._settings.default_context_tokens
                built = build_context(for_model(history), request.system_prompt, budget, counter)
        self._metrics.context_tokens.labels(counter.name).observe(built.total_tokens)
        return session_pb2.BuildContextResponse(
            messages=[to_proto(m) for m in built.messages], total_tokens=built.total_tokens,
            truncated=built.truncated, user_message_count=meta.user_message_count)

    async def ListMessages(
            self, request: session_pb2.ListMessagesRequest,
            context: grpc.aio.ServicerContext[session_pb2.ListMessagesRequest, session_pb2.ListMessagesResponse],
    ) -> session_pb2.ListMessagesResponse:
        async with session_errors(context):
            with self._metrics.operation_seconds.labels("list").time():
                _, history = await self._store.messages(principal_of(request), request.session_id)
        return session_pb2.ListMessagesResponse(session_id=request.session_id,
                                                messages=[to_proto(m) for m in history])

    async def DeleteSession(
            self, request: session_pb2.DeleteSessionRequest,
            context: grpc.aio.ServicerContext[session_pb2.DeleteSessionRequest, session_pb2.DeleteSessionResponse],
    ) -> session_pb2.DeleteSessionResponse:
        async with session_errors(context):
            with self._metrics.operation_seconds.labels("delete").time():
                deleted = await self._store.delete(principal_of(request), request.session_id)
        return session_pb2.DeleteSessionResponse(deleted_messages=deleted)


async def create_server(settings: SessionSettings, servicer: SessionServicer,
                        metrics: SessionMetrics) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Build the server with health and reflection and bind it; do not start."""
    server = create_grpc_server(metrics.registry, settings.internal_token)
    session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    health_servicer = await add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, settings.host, settings.grpc_port)
    return server, health_servicer, port


async def _arm_stored(nc: NatsClient, schedule: TimerSchedule) -> None:
    """The one-time backfill, beside serving: a failure leaves it to the next start."""
    try:
        await arm_stored(nc, schedule)
    except (NatsError, TimeoutError) as error:
        log.warning("timers of stored conversations not armed: %s", str(error) or type(error).__name__)


async def serve(settings: SessionSettings) -> None:
    metrics = SessionMetrics()
    metrics_server = start_metrics_server(metrics.registry, settings.metrics_port, settings.host)
    counters = TokenCounters(settings.encoding)
    counters.preload()  # the default encoding; others load on their first model
    nc = await connect_nats(settings.nats_url, "kefu-session")
    background: list[asyncio.Task[None]] = []
    try:
        usage = await TenantUsage.open(nc, settings.tenant_max_stored_bytes, settings.session_ttl_s * 2,
                                       replicas=settings.nats_replicas)
        rates = await VisitorRates.open(nc, settings.visitor_msg_rps, settings.visitor_msg_burst,
                                        replicas=settings.nats_replicas)
        schedule = await TimerSchedule.open(nc, TimerLimits(
            wait_s=settings.handoff_wait_s, idle_s=settings.idle_close_s, retention_s=settings.retention_s),
            replicas=settings.nats_replicas)
        store = await SessionStore.open(
            nc, counters.default_counter, max_history=settings.max_history_messages,
            max_message_chars=settings.max_message_chars, ttl_s=settings.session_ttl_s,
            replicas=settings.nats_replicas, max_bytes=settings.messages_max_bytes,
            max_visitor_conversations=settings.visitor_max_conversations, usage=usage,
            answer_lease_s=settings.answer_lease_s, schedule=schedule)
        timers = await ConversationTimers.open(nc, store, metrics, replicas=settings.nats_replicas)
        background.append(asyncio.create_task(store.watch_expired(metrics.sessions_expired.inc)))
        background.append(asyncio.create_task(timers.run()))
        background.append(asyncio.create_task(usage.run()))
        background.append(asyncio.create_task(rates.run()))
        background.append(asyncio.create_task(_arm_stored(nc, schedule)))
        servicer = SessionServicer(settings, store, counters, metrics, rates)
        server, health_servicer, port = await create_server(settings, servicer, metrics)
        await server.start()
        log.info("session service on %s:%d", settings.host, port)
        await wait_for_stop_signal()
        servicer.drain()
        await stop_gracefully(server, health_servicer, settings.grace_s)
        await store.close()  # the counters still pending
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await close_nats(nc)
        metrics_server.close()
