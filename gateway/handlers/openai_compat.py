"""POST /v1/chat/completions: the OpenAI wire format over the same turn as /v1/chat.

`api` tokens (server-to-server integrators) and staff get the whole surface kefu implements: their own
system prompt and history, any route, up to 32,768 output tokens. A visitor (every widget token) gets
the tenant's: its system prompt, the `default` route and the output cap (KEFU_MAX_OUTPUT_TOKENS); it
sends user messages only (issue 17: else the endpoint is a free, unmoderated LLM proxy).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.auth import Principal
from gateway.bodies import read_json_body
from gateway.chat_turn import (
    ChatTurn,
    ContextMessage,
    StreamFailed,
    TurnDelta,
    TurnDone,
    TurnEvent,
    TurnRequest,
    TurnStarted,
    collect_answer,
)
from gateway.errors import InvalidRequest
from gateway.openai_format import (
    CompletionRequest,
    ParameterError,
    UnsupportedParameters,
    chunk,
    completion,
    openai_finish_reason,
    usage_chunk,
)
from gateway.responses import json_response
from gateway.settings import GatewaySettings
from gateway.sse import sse_data
from gateway.streaming import event_stream

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_HISTORY_MESSAGES = 200
VISITOR_ROUTE = "default"


def visitor_models(settings: GatewaySettings) -> frozenset[str]:
    """The `model` names a visitor may send: the default route, by its alias or its upstream model's name."""
    return frozenset(filter(None, (VISITOR_ROUTE, settings.model)))


def check_visitor(body: CompletionRequest, session_id: str, settings: GatewaySettings) -> None:
    """What a visitor may not send: another system prompt, forged answers, another route."""
    for index, message in enumerate(body.messages):
        if message.role != "user":
            raise ParameterError("role_not_allowed", f"messages[{index}]: role {message.role!r} is not allowed "
                                 "with a visitor token (the tenant's system prompt applies; only user messages)",
                                 f"messages[{index}].role")
    if body.model not in visitor_models(settings):
        allowed = " or ".join(repr(name) for name in sorted(visitor_models(settings)))
        raise ParameterError("model_not_allowed", f"model {body.model!r} is not available to a visitor token; "
                             f"use {allowed}", "model")
    if session_id and len(body.messages) > 1:
        raise ParameterError("history_not_allowed", "with X-Session-Id the stored conversation is the context: "
                             "send only the new user message", "messages")


def turn_request(body: CompletionRequest, principal: Principal, session_id: str,
                 settings: GatewaySettings) -> TurnRequest:
    max_message_chars = settings.max_message_chars
    unsupported = body.unsupported()
    if unsupported:
        raise UnsupportedParameters(unsupported)
    if principal.is_visitor:
        check_visitor(body, session_id, settings)
    *earlier, last = body.messages
    if last.role != "user":
        raise InvalidRequest("messages: the last message must have role 'user'")
    if len(body.messages) > MAX_HISTORY_MESSAGES:
        raise InvalidRequest(f"messages: at most {MAX_HISTORY_MESSAGES} messages")
    texts = [m.text() for m in body.messages]
    if any(len(t) > max_message_chars for t in texts):
        raise InvalidRequest(f"messages: a message is longer than {max_message_chars} characters")
    if not texts[-1].strip():
        raise InvalidRequest("messages: the last user message is empty")
    history: tuple[ContextMessage, ...] | None = tuple(
        ContextMessage("system" if m.role == "developer" else m.role, m.text()) for m in earlier)
    if principal.is_visitor and session_id:
        history = None  # the session builds the context: the tenant's prompt and the stored conversation
    return TurnRequest(message=texts[-1], session_id=session_id,
                       route=VISITOR_ROUTE if principal.is_visitor else body.model,
                       # A visitor's max_tokens is clamped to the tenant's cap by the turn.
                       max_tokens=body.max_completion_tokens or body.max_tokens or 0,
                       temperature=body.temperature, history=history, sticky_key=body.user or "",
                       start_on_first_delta=True)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[keys.SETTINGS]
    body = await read_json_body(request, CompletionRequest)
    session_id = request.headers.get("X-Session-Id", "")
    if session_id and not SESSION_ID.fullmatch(session_id):
        raise InvalidRequest("X-Session-Id must be a session id (32 hex characters)")
    principal = request[keys.REQUEST_PRINCIPAL]
    turn = ChatTurn(request.app[keys.CLIENTS], settings, principal, request[keys.REQUEST_ID],
                    request.app.get(keys.TENANT_SETTINGS), bus=request.app.get(keys.BUS))
    events = turn.run(turn_request(body, principal, session_id, settings))
    try:
        started = await anext(events)  # errors until the answer begins are plain HTTP errors
        assert isinstance(started, TurnStarted)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(request, body.model, started, events, include_usage)
        return await _collect(body.model, started, events)
    finally:
        await events.aclose()


async def _collect(model: str, started: TurnStarted, events: AsyncIterator[TurnEvent]) -> web.Response:
    text, done = await collect_answer(events)
    headers = {"X-Session-Id": started.session_id} if started.session_id else None
    return json_response(completion(done.message_id, model, text, openai_finish_reason(done.finish_reason),
                                    done.prompt_tokens, done.completion_tokens,
                                    [c.to_json() for c in done.citations]), headers=headers)


async def _stream(request: web.Request, model: str, started: TurnStarted, events: AsyncIterator[TurnEvent],
                  include_usage: bool) -> web.StreamResponse:
    metrics = request.app[keys.METRICS]
    created = int(time.time())
    message_id = started.message_id
    headers = {"X-Session-Id": started.session_id} if started.session_id else None
    async with event_stream(request, headers) as response:
        await response.write(sse_data(chunk(message_id, model, created, {"role": "assistant", "content": ""}, None)))
        try:
            async for event in events:
                if isinstance(event, TurnDelta):
                    await response.write(sse_data(chunk(message_id, model, created, {"content": event.text}, None)))
                elif isinstance(event, TurnDone):
                    await response.write(sse_data(chunk(message_id, model, created, {},
                                                        openai_finish_reason(event.finish_reason),
                                                        [c.to_json() for c in event.citations])))
                    if include_usage:
                        await response.write(sse_data(usage_chunk(message_id, model, created, event.prompt_tokens,
                                                                  event.completion_tokens)))
            await response.write(sse_data("[DONE]"))
        except StreamFailed as failure:
            # What OpenAI sends when a stream fails: an error object as the last data line.
            metrics.stream_errors.labels(failure.code).inc()
            await response.write(sse_data({"error": {"message": failure.message, "type": "api_error",
                                                     "param": None, "code": failure.code}}))
    return response
