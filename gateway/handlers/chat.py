"""POST /v1/chat: one turn, streamed as SSE or answered as one JSON object."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

import pydantic
from aiohttp import web

from gateway import keys
from gateway.bodies import read_json_body
from gateway.chat_turn import (
    ChatTurn,
    StreamFailed,
    TurnDelta,
    TurnDone,
    TurnEvent,
    TurnRequest,
    TurnStarted,
    collect_answer,
)
from gateway.errors import InvalidRequest
from gateway.responses import json_response
from gateway.sse import sse_event
from gateway.streaming import event_stream

log = logging.getLogger(__name__)


class ChatBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    message: Annotated[str, pydantic.StringConstraints(min_length=1)]
    # Any string: an id that is malformed answers 404 exactly like one that never existed.
    session_id: Annotated[str, pydantic.StringConstraints(max_length=128)] | None = None
    stream: bool = True


def done_payload(done: TurnDone) -> dict[str, object]:
    return {"message_id": done.message_id, "finish_reason": done.finish_reason,
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
            "cached": done.cached, "model": done.model, "citations": [c.to_json() for c in done.citations]}


async def chat(request: web.Request) -> web.StreamResponse:
    settings = request.app[keys.SETTINGS]
    body = await read_json_body(request, ChatBody)
    if len(body.message) > settings.max_message_chars:
        raise InvalidRequest(f"message: longer than {settings.max_message_chars} characters")
    if not body.message.strip():
        raise InvalidRequest("message: must not be blank")
    # With the bus, an agent's claim ends the stream at once with `superseded` (issue 17).
    turn = ChatTurn(request.app[keys.CLIENTS], settings, request[keys.REQUEST_PRINCIPAL], request[keys.REQUEST_ID],
                    request.app.get(keys.TENANT_SETTINGS), bus=request.app.get(keys.BUS))
    events = turn.run(TurnRequest(message=body.message, session_id=body.session_id or ""))
    try:
        # Errors before the first event are plain JSON errors (404, 400 content_blocked, 503).
        started = await anext(events)
        assert isinstance(started, TurnStarted)
        if body.stream:
            return await _stream(request, started, events)
        return await _collect(started, events)
    finally:
        await events.aclose()


async def _collect(started: TurnStarted, events: AsyncIterator[TurnEvent]) -> web.Response:
    reply, done = await collect_answer(events)
    return json_response({"session_id": started.session_id, "reply": reply, **done_payload(done)})


async def _stream(request: web.Request, started: TurnStarted,
                  events: AsyncIterator[TurnEvent]) -> web.StreamResponse:
    metrics = request.app[keys.METRICS]
    start = time.perf_counter()
    first = True
    async with event_stream(request) as response:
        await response.write(sse_event("session", {"session_id": started.session_id,
                                                   "message_id": started.message_id}))
        try:
            async for event in events:
                if isinstance(event, TurnDelta):
                    if first:
                        metrics.ttft_seconds.observe(time.perf_counter() - start)
                        first = False
                    await response.write(sse_event("message", {"delta": event.text}))
                elif isinstance(event, TurnDone):
                    await response.write(sse_event("done", done_payload(event)))
        except StreamFailed as failure:
            metrics.stream_errors.labels(failure.code).inc()
            log.info("stream %s ended with %s", started.session_id, failure.code)
            await response.write(sse_event("error", {"code": failure.code, "message": failure.message}))
    return response
