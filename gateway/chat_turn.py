"""One chat turn across the three services: check input, store it, build context, stream, filter, store.

The turn is an async generator of events; everything before `TurnStarted` may raise
ApiError (the client gets a plain JSON error), everything after ends in `TurnDone` or
raises StreamFailed (the client gets an SSE `error` event).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass, replace

import grpc
import nats.errors

from gateway.auth import Principal
from gateway.bus import EdgeBus
from gateway.clients import BackendClients, request_metadata, session_principal
from gateway.directory.tenants import TenantSettings, TenantSettingsStore
from gateway.errors import ApiError, ContentBlocked, api_error_from_grpc
from gateway.settings import GatewaySettings
from gateway.state_watch import StateWatch
from kefu.llm.v1 import llm_pb2
from kefu.moderation.v1 import moderation_pb2
from kefu.session.v1 import session_pb2
from services.common.errors import KefuError


@dataclass(frozen=True, slots=True)
class ContextMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class TurnRequest:
    message: str
    """The visitor's new text (checked by moderation, stored in the session)."""
    session_id: str = ""
    route: str = ""
    max_tokens: int = 0
    temperature: float | None = None
    history: tuple[ContextMessage, ...] | None = None
    """The context before `message`, supplied by the client (OpenAI API); None builds it from the
    session. With a history, the session (if any) only records the turn. A visitor's history holds
    user messages only, and the tenant's system prompt goes before it. A non-empty history makes
    the turn private: no shared cache, no single flight (issue 17)."""
    sticky_key: str = ""
    """Keeps a canary split stable for a client without a session (OpenAI `user`)."""
    start_on_first_delta: bool = False
    """Hold TurnStarted until the answer has begun, so a failing model is a plain HTTP error."""
    message_id: str = ""
    """Id to store the visitor's message under (32 hex); the same id again is stored once."""
    answer: bool = True
    """False stores the message without an AI answer (the visitor asked for a human)."""


@dataclass(frozen=True, slots=True)
class TurnStarted:
    session_id: str
    message_id: str
    """Id of the assistant message this turn produces."""
    state: session_pb2.ConversationState | None = None
    """The conversation's state once the visitor's message was stored (None without a session)."""
    answering: bool = True
    """False: the message was stored and nobody answers it here (a human has or awaits it)."""


@dataclass(frozen=True, slots=True)
class TurnDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Citation:
    """A source the answer cites: a passage of one of the tenant's documents."""

    document_id: str
    title: str
    url: str
    chunk_id: str
    quote: str

    @classmethod
    def of(cls, proto: llm_pb2.Citation) -> Citation:
        return cls(proto.document_id, proto.title, proto.url, proto.chunk_id, proto.quote)

    def to_json(self) -> dict[str, str]:
        return {"document_id": self.document_id, "title": self.title, "url": self.url,
                "chunk_id": self.chunk_id, "quote": self.quote}

    def to_session(self) -> session_pb2.Citation:
        return session_pb2.Citation(document_id=self.document_id, title=self.title, url=self.url,
                                    chunk_id=self.chunk_id, quote=self.quote)


@dataclass(frozen=True, slots=True)
class TurnDone:
    message_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    model: str
    citations: tuple[Citation, ...] = ()
    """The tenant's documents the answer cites, in order of first use."""


TurnEvent = TurnStarted | TurnDelta | TurnDone

SUPERSEDED = "superseded"
"""finish_reason of an answer dropped because the conversation changed state meanwhile (an agent claimed)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Prepared:
    session_id: str
    context: list[ContextMessage]
    state: session_pb2.ConversationState | None
    seq: int
    """Log seq of the visitor's stored message (0 without a session)."""


class _StateChanged(Exception):
    """The conversation changed state while the answer streamed: stop relaying it."""


class DuplicateMessage(KefuError):
    """The visitor's message id was stored before (a resend): nothing new to answer."""

    def __init__(self, session_id: str, seq: int) -> None:
        super().__init__(f"message already stored as seq {seq}")
        self.session_id = session_id
        self.seq = seq


class StreamFailed(KefuError):
    """The stream started and then failed; `code` goes into the SSE `error` event."""

    def __init__(self, code: str, message: str, status: int = 502, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        """The HTTP status (and headers) it would have had before the stream started."""
        self.headers = headers or {}

    def as_api_error(self) -> ApiError:
        return ApiError(self.code, self.message, self.status, headers=self.headers)


def _stream_failure(error: grpc.aio.AioRpcError, backend: str) -> StreamFailed:
    api_error = api_error_from_grpc(error, backend)
    return StreamFailed(api_error.code, api_error.message, api_error.status, api_error.headers)


class ChatTurn:
    def __init__(self, clients: BackendClients, settings: GatewaySettings, principal: Principal,
                 request_id: str, tenant_settings: TenantSettingsStore | None = None, *,
                 bus: EdgeBus | None = None) -> None:
        self._clients = clients
        self._settings = settings
        self._principal = session_principal(principal.session_caller())
        self._tenant = principal.tenant
        self._visitor = principal.is_visitor
        self._metadata = request_metadata(request_id)
        self._request_id = request_id
        self._bus = bus
        """With NATS, an answer stops the moment an agent claims its conversation (else only at its end)."""
        self._tenant_settings = tenant_settings
        self._assistant = TenantSettings()

    async def run(self, request: TurnRequest) -> AsyncGenerator[TurnEvent, None]:
        text, history = await self._check_inputs(request)
        if self._tenant_settings is not None:
            self._assistant = await self._tenant_settings.get(self._tenant)  # cached; defaults when unreadable
        request = self._with_tenant_route(request)
        prepared = await self._prepare(request, text, history)
        session_id, context, state = prepared.session_id, prepared.context, prepared.state
        message_id = secrets.token_hex(16)
        if not request.answer or (state is not None and state.status not in ("", "ai")):
            # The AI never answers a conversation that a human holds or awaits (docs/api.md, handoff states).
            yield TurnStarted(session_id, message_id, state, answering=False)
            yield TurnDone(message_id, state.status if state is not None and state.status else "stored",
                           0, 0, False, "")
            return
        watch = await self._watch(prepared)
        source = self._filtered_answer(request, session_id, context, watch)
        first: str | llm_pb2.Done | None = None
        parts: list[str] = []
        done: llm_pb2.Done | None = None
        superseded = False
        try:
            if request.start_on_first_delta:
                try:
                    first = await anext(source)
                except StreamFailed as failure:
                    raise failure.as_api_error() from None
                except _StateChanged:
                    superseded = True
            yield TurnStarted(session_id, message_id, state)
            if not superseded:
                pending = [first] if first is not None else []
                try:
                    async for item in _chain(pending, source):
                        if isinstance(item, str):
                            parts.append(item)
                            yield TurnDelta(item)
                        else:
                            done = item
                except _StateChanged:
                    superseded = True
        finally:
            await source.aclose()  # cancels the generation upstream
            if watch is not None:
                await watch.stop()
        if superseded:
            # The contract: a reply in flight when an agent claims never reaches the visitor; nothing is stored.
            yield TurnDone(message_id, SUPERSEDED, 0, 0, False, "")
            return
        assert done is not None
        finish_reason = done.finish_reason
        citations = tuple(Citation.of(c) for c in done.citations)
        if session_id and parts:
            try:
                # Stored only if no agent claimed the conversation while the answer was generated.
                await self._clients.calls.append(session_pb2.AppendRequest(
                    principal=self._principal, session_id=session_id, role="assistant",
                    content="".join(parts), message_id=message_id,
                    if_version=state.version if state is not None else 0, after_seq=prepared.seq,
                    citations=[c.to_session() for c in citations]),
                    self._settings.rpc_timeout_s, self._request_id)
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.ABORTED:
                    raise _stream_failure(error, "session") from None
                finish_reason = SUPERSEDED
        yield TurnDone(message_id, finish_reason, done.usage.prompt_tokens, done.usage.completion_tokens,
                       done.cached, done.model, citations)

    def _with_tenant_route(self, request: TurnRequest) -> TurnRequest:
        """The tenant's route answers its visitors (and any caller that names none)."""
        route = self._assistant.route
        if route and (self._visitor or not request.route):
            return replace(request, route=route)
        return request

    def _system_prompt(self) -> str:
        return self._assistant.system_prompt or self._settings.system_prompt

    async def _prepare(self, request: TurnRequest, text: str,
                       history: tuple[ContextMessage, ...] | None) -> _Prepared:
        """Store the visitor's message (when there is a session); the context to send and the
        conversation's state after the message."""
        if history is not None and self._visitor:
            # A visitor gets the tenant's system prompt, never one of its own (issue 17).
            history = (ContextMessage("system", self._system_prompt()), *history)
        if history is not None and not request.session_id:
            return _Prepared("", [*history, ContextMessage("user", text)], None, 0)
        # One round trip: the message stored and, when the AI is to answer, the context built.
        begin = session_pb2.BeginTurnRequest(
            principal=self._principal, session_id=request.session_id, content=text,
            message_id=request.message_id, system_prompt=self._system_prompt(),
            max_tokens=self._settings.context_max_tokens,
            model=self._settings.model if not request.route or request.route == "default" else "",
            store_only=history is not None or not request.answer)
        try:
            begun = await self._clients.calls.begin_turn(begin, self._settings.rpc_timeout_s, self._request_id)
        except grpc.aio.AioRpcError as error:
            raise api_error_from_grpc(error, "session") from None
        appended = begun.stored
        if appended.duplicate:
            raise DuplicateMessage(appended.session_id, appended.message.seq)
        state = appended.state if appended.HasField("state") else None
        seq = appended.message.seq
        if history is not None:
            return _Prepared(appended.session_id, [*history, ContextMessage("user", text)], state, seq)
        # No context when nobody asks the model (the visitor asked for a human, or one has it).
        context = [ContextMessage(m.role, m.content) for m in begun.context.messages]
        return _Prepared(appended.session_id, context, state, seq)

    async def _check_inputs(self, request: TurnRequest) -> tuple[str, tuple[ContextMessage, ...] | None]:
        """The new message and every user turn of a client's history through moderation (issue 17: not
        only the last); a BLOCK in any is ContentBlocked, a MASK goes on masked."""
        earlier = [m.content for m in request.history or () if m.role == "user"]
        checked = await asyncio.gather(*(
            checked_input(self._clients, self._settings, self._tenant, text, self._request_id)
            for text in (request.message, *earlier)))
        if request.history is None:
            return checked[0], None
        masked = iter(checked[1:])
        history = tuple(ContextMessage(m.role, next(masked)) if m.role == "user" else m for m in request.history)
        return checked[0], history

    async def _watch(self, prepared: _Prepared) -> StateWatch | None:
        """A watch on the conversation's state while its answer streams (None without a session or NATS)."""
        if not prepared.session_id or prepared.state is None or self._bus is None or not self._bus.is_connected:
            return None
        try:
            return await StateWatch.start(self._bus.nc, self._tenant, prepared.session_id, prepared.seq,
                                          prepared.state.version)
        except (nats.errors.Error, TimeoutError) as error:
            log.debug("no state watch for this answer (%s)", error or type(error).__name__)
            return None

    async def _filtered_answer(self, request: TurnRequest, session_id: str, context: list[ContextMessage],
                               watch: StateWatch | None) -> AsyncGenerator[str | llm_pb2.Done, None]:
        """Safe deltas of the answer, then its Done; a BLOCK word ends it with StreamFailed, a change of the
        conversation's state (`watch`) with _StateChanged, at once, even while the next delta is awaited."""
        max_tokens = request.max_tokens
        if self._visitor:
            # Visitors never get more than the tenant's cap, whatever they ask for (issue 17).
            cap = self._settings.output_cap(self._tenant)
            max_tokens = min(max_tokens, cap) if max_tokens else cap
        generate = llm_pb2.GenerateRequest(
            route=request.route, tenant=self._tenant, session_id=session_id or request.sticky_key,
            max_tokens=max_tokens, grounding=self._assistant.grounding,
            assistant_name=self._assistant.assistant_name,
            messages=[llm_pb2.ChatMessage(role=m.role, content=m.content) for m in context],
            # Only a context the server holds entire may meet other turns in the cache or a flight.
            shareable=not request.history)
        if request.temperature is not None:
            generate.temperature = request.temperature
        answer = self._clients.llm.Generate(generate, timeout=self._settings.stream_timeout_s,
                                            metadata=self._metadata)
        if watch is not None:
            # A claim cancels the call: the pending read ends at once (grpc.aio raises CancelledError), and
            # no task per delta races the read against the watch.
            watch.on_change(answer.cancel)
        # Output moderation runs inside the worker (issue 20): every delta that arrives has passed the
        # lexicon's filter, and a blocked word ends the answer with a Done marked `blocked`.
        try:
            done: llm_pb2.Done | None = None
            async for response in answer:
                if response.HasField("done"):
                    done = response.done
                    break
                if response.delta:
                    yield response.delta
                    if watch is not None and watch.changed.is_set():
                        raise _StateChanged()
            if watch is not None and watch.changed.is_set():
                raise _StateChanged()
            if done is None:
                raise StreamFailed("upstream_unavailable", "the answer stream ended early")
            if done.blocked:
                raise StreamFailed("content_blocked", "the answer contained blocked content and was stopped")
            yield done
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if watch is not None and watch.changed.is_set() and task is not None and not task.cancelling():
                raise _StateChanged() from None  # our own cancel of the call, not of this task
            raise
        except grpc.aio.AioRpcError as error:
            if watch is not None and watch.changed.is_set() and error.code() is grpc.StatusCode.CANCELLED:
                raise _StateChanged() from None
            raise _stream_failure(error, _answer_backend(error)) from None
        finally:
            # Leaving the loop does not cancel a gRPC stream by itself (grpc.aio keeps it streaming).
            answer.cancel()


def _answer_backend(error: grpc.aio.AioRpcError) -> str:
    """"moderation" when the worker refused for want of a lexicon (its output filter fails closed)."""
    trailers = error.trailing_metadata() or ()
    refused = any(key == "kefu-error" and value == "moderation_unavailable" for key, value in trailers)
    return "moderation" if refused else "llm"


async def checked_input(clients: BackendClients, settings: GatewaySettings, tenant: str, text: str,
                        request_id: str) -> str:
    """The text as moderation lets it on (masked where it says so); ContentBlocked for a BLOCK, and the
    edge's error for moderation being unreachable: nothing unfiltered goes on (fail closed). Over the
    moderation call stream (gateway/call_streams.py), as every call of a turn before its answer."""
    check = moderation_pb2.CheckRequest(tenant=tenant, text=text)
    try:
        verdict = await clients.calls.check(check, settings.rpc_timeout_s, request_id)
    except grpc.aio.AioRpcError as error:
        raise api_error_from_grpc(error, "moderation") from None
    if verdict.verdict == moderation_pb2.VERDICT_BLOCK:
        raise ContentBlocked()
    return verdict.masked_text if verdict.verdict == moderation_pb2.VERDICT_MASK else text


async def _chain(first: Iterable[str | llm_pb2.Done],
                 rest: AsyncIterator[str | llm_pb2.Done]) -> AsyncIterator[str | llm_pb2.Done]:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def collect_answer(events: AsyncIterator[TurnEvent]) -> tuple[str, TurnDone]:
    """The whole answer of a started turn (non-streaming replies); a failure becomes an HTTP error."""
    parts: list[str] = []
    try:
        async for event in events:
            if isinstance(event, TurnDelta):
                parts.append(event.text)
            elif isinstance(event, TurnDone):
                # A superseded answer never reaches the visitor, not even as what had arrived of it.
                return ("" if event.finish_reason == SUPERSEDED else "".join(parts)), event
    except StreamFailed as failure:
        raise failure.as_api_error() from None
    raise RuntimeError("turn ended without done")
