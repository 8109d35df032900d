"""POST /v1/chat/completions: the OpenAI wire format over the same turn as /v1/chat."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator

from aiohttp import web

from gateway import keys
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
    chunk,
    completion,
    openai_finish_reason,
    usage_chunk,
)
from gateway.responses import json_response
from gateway.sse import sse_data
from gateway.streaming import event_stream

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_HISTORY_MESSAGES = 200


def turn_request(body: CompletionRequest, session_id: str, max_message_chars: int) -> TurnRequest:
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
    history = tuple(ContextMessage("system" if m.role == "developer" else m.role, m.text()) for m in earlier)
    return TurnRequest(message=texts[-1], session_id=session_id, route=body.model,
                       max_tokens=body.max_completion_tokens or body.max_tokens or 0,
                       temperature=body.temperature, history=history, sticky_key=body.user or "",
                       start_on_first_delta=True)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[keys.SETTINGS]
    body = await read_json_body(request, CompletionRequest)
    session_id = request.headers.get("X-Session-Id", "")
    if session_id and not SESSION_ID.fullmatch(session_id):
        raise InvalidRequest("X-Session-Id must be a session id (32 hex characters)")
    turn = ChatTurn(request.app[keys.CLIENTS], settings, request[keys.REQUEST_PRINCIPAL], request[keys.REQUEST_ID],
                    request.app.get(keys.TENANT_SETTINGS))
    events = turn.run(turn_request(body, session_id, settings.max_message_chars))
    try:
        started = await anext(events)  # errors until the answer begins are plain HTTP errors
        assert isinstance(started, TurnStarted)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(request, body.model, started, events, include_usage)
        return await _collect(body.model, started, events)
    finally:
        await events.aclose()


async def _collect(model: str, started: TurnStarted, events: AsyncGenerator[TurnEvent, None]) -> web.Response:
    text, done = await collect_answer(events)
    headers = {"X-Session-Id": started.session_id} if started.session_id else None
    return json_response(completion(done.message_id, model, text, openai_finish_reason(done.finish_reason),
                                    done.prompt_tokens, done.completion_tokens,
                                    [c.to_json() for c in done.citations]), headers=headers)


async def _stream(request: web.Request, model: str, started: TurnStarted, events: AsyncGenerator[TurnEvent, None],
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
