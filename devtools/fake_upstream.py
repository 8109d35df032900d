"""A fake OpenAI-compatible server (chat completions, embeddings), exact to the wire format, for tests and benches."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from aiohttp import web

# The fake's settings are part of its interface: importable from here, as its users always have.
from devtools.fake_config import DEFAULT_DECLINE_MARKER as DEFAULT_DECLINE_MARKER
from devtools.fake_config import FakeUpstreamConfig as FakeUpstreamConfig
from devtools.fake_config import FakeUpstreamStats as FakeUpstreamStats
from devtools.fake_embeddings import EmbeddingsRequestError, embeddings_response, parse_embeddings_request
from devtools.fake_replies import content_text, count_prompt_tokens, cut_to_tokens, encoding, grounded_reply, split_text
from devtools.fake_requests import ApiError, ChatRequest, check_auth, parse_chat_request

CONFIG = web.AppKey("config", FakeUpstreamConfig)
STATS = web.AppKey("stats", FakeUpstreamStats)
CLOSING = web.AppKey("closing", asyncio.Event)
ReceivedBody = dict[str, Any]
"""A request body as the fake received it: JSON of any shape that tests look into (hence Any)."""
RECEIVED = web.AppKey("received", deque[ReceivedBody])
RECEIVED_EMBEDDINGS = web.AppKey("received_embeddings", deque[ReceivedBody])


def reply_for(config: FakeUpstreamConfig, messages: Sequence[Mapping[str, object]]) -> str:
    if config.reply is not None:
        return config.reply
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    question = content_text(last_user.get("content")) if last_user else ""
    if config.grounded:
        return grounded_reply(messages, question, config.decline_marker)
    return "Echo: " + question


def _usage_counts(config: FakeUpstreamConfig, chat: ChatRequest, completion_tokens: int) -> tuple[int, int]:
    return (
        config.usage if config.usage is not None else (count_prompt_tokens(chat.messages), completion_tokens)
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int | dict[str, int]]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class _ChunkWriter:
    """Writes `chat.completion.chunk` events of one completion."""

    def __init__(self, response: web.StreamResponse, config: FakeUpstreamConfig, chat: ChatRequest) -> None:
        self._response = response
        self._config = config
        self._include_usage = chat.include_usage and config.send_usage
        self._base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": config.model or chat.model,
            "system_fingerprint": "fp_kefu_fake",
        }

    async def raw(self, data: bytes) -> None:
        step = self._config.write_size or len(data)
        for start in range(0, len(data), step):
            await self._response.write(data[start : start + step])
            if self._config.write_size:
                await asyncio.sleep(0)  # let each piece leave as its own write

    async def event(self, payload: Mapping[str, object] | str) -> None:
        data = payload.encode() if isinstance(payload, str) else _dumps(payload)
        await self.raw(b"data: " + data + b"\n\n")

    async def chunk(self, delta: Mapping[str, object], finish_reason: str | None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload: dict[str, Any] = {**self._base, "choices": [choice]}
        if self._include_usage:
            payload["usage"] = None  # OpenAI sends null usage on every chunk but the last
        await self.event(payload)

    async def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        await self.event({**self._base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})


async def _stream_completion(request: web.Request, chat: ChatRequest) -> web.StreamResponse:
    config = request.app[CONFIG]
    text, completion_tokens, finish_reason = cut_to_tokens(reply_for(config, chat.messages), chat.max_tokens)
    await asyncio.sleep(config.ttft_s)
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    response.charset = "utf-8"
    await response.prepare(request)
    writer = _ChunkWriter(response, config, chat)
    await writer.chunk({"role": "assistant", "content": "", "refusal": None}, None)
    for index, piece in enumerate(split_text(text, config.chunk_count)):
        if await _failure_before_chunk(writer, config, index, request.app[CLOSING]):
            return response
        if index:
            await asyncio.sleep(config.chunk_interval_s)
        if config.keepalive_comments:
            await writer.raw(b": keep-alive\n\n")
        await writer.chunk({"content": piece}, None)
    await writer.chunk({}, finish_reason)
    if chat.include_usage and config.send_usage:
        await writer.usage(*_usage_counts(config, chat, completion_tokens))
    await writer.event("[DONE]")
    return response


async def _failure_before_chunk(
    writer: _ChunkWriter, config: FakeUpstreamConfig, index: int, closing: asyncio.Event
) -> bool:
    """Apply the configured failure before content chunk `index`; True when the stream must end here."""
    if config.hang_after_chunks == index:
        await closing.wait()  # silent until the client goes away or the server closes
        return True
    if config.truncate_after_chunks == index:
        return True
    if config.malformed_after_chunks == index:
        await writer.raw(b'data: {"id": "chatcmpl-broken", "choices": [\n\n')
        return True
    return False


async def _complete(request: web.Request, chat: ChatRequest) -> web.Response:
    config = request.app[CONFIG]
    text, completion_tokens, finish_reason = cut_to_tokens(reply_for(config, chat.messages), chat.max_tokens)
    pieces = max(1, len(split_text(text, config.chunk_count)))
    await asyncio.sleep(config.ttft_s + config.chunk_interval_s * (pieces - 1))
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": config.model or chat.model,
        "system_fingerprint": "fp_kefu_fake",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": _usage(*_usage_counts(config, chat, completion_tokens)),
        "service_tier": "default",
    }
    return web.json_response(body, dumps=lambda obj: _dumps(obj).decode())


async def _authorized_body(request: web.Request) -> Any:  # JSON of any shape, recorded as received
    """The request's JSON body (None when it is not JSON), after the API key check (ApiError 401)."""
    check_auth(request, request.app[CONFIG].expected_api_key)
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        return None


async def _answer_chat(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    try:
        body = await _authorized_body(request)
        chat = parse_chat_request(body)
        request.app[RECEIVED].append(body)
        if config.fail_status is not None:
            raise ApiError(
                config.fail_status, f"The fake upstream was told to fail with {config.fail_status}."
            )
    except ApiError as error:
        request.app[STATS].failed += 1
        return error.response()
    return await (_stream_completion(request, chat) if chat.stream else _complete(request, chat))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    stats.requests_total += 1
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        response = await _answer_chat(request)
    except (asyncio.CancelledError, ConnectionResetError):
        # handler_cancellation=True turns a client disconnect into CancelledError here.
        stats.cancelled += 1
        raise
    finally:
        stats.in_flight -= 1
    if response.status < 400:
        stats.completed += 1
    return response


async def embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings: deterministic vectors (devtools/fake_embeddings.py) in OpenAI's wire format."""
    config = request.app[CONFIG]
    try:
        body = await _authorized_body(request)
        try:
            model, inputs, encoding_format, dimensions = parse_embeddings_request(body)
        except EmbeddingsRequestError as error:
            raise ApiError(400, error.message, param=error.param, code="invalid_value" if error.param else None) \
                from None
        request.app[RECEIVED_EMBEDDINGS].append(body)
        if config.embeddings_fail_status is not None:
            raise ApiError(config.embeddings_fail_status,
                            f"The fake upstream was told to fail embeddings with {config.embeddings_fail_status}.")
    except ApiError as error:
        return error.response()
    await asyncio.sleep(config.embeddings_delay_s)
    tokens = sum(len(encoding().encode(text)) for text in inputs)
    return web.json_response(embeddings_response(config.model or model, inputs, encoding_format, tokens, dimensions),
                             dumps=lambda obj: _dumps(obj).decode())


async def list_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    try:
        check_auth(request, config.expected_api_key)
    except ApiError as error:
        return error.response()
    model = {
        "id": config.model or "fake-model",
        "object": "model",
        "created": 1700000000,
        "owned_by": "kefu-fake",
    }
    return web.json_response({"object": "list", "data": [model]})


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].as_dict())


def create_app(config: FakeUpstreamConfig, stats: FakeUpstreamStats | None = None) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[STATS] = stats if stats is not None else FakeUpstreamStats()
    app[CLOSING] = asyncio.Event()
    app[RECEIVED] = deque(maxlen=100)
    app[RECEIVED_EMBEDDINGS] = deque(maxlen=1000)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/stats", get_stats)
    return app


class FakeUpstream:
    """A running fake upstream; `async with FakeUpstream(config) as upstream:` starts and stops it."""

    def __init__(
        self, config: FakeUpstreamConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else FakeUpstreamConfig()
        self.host = host
        self._requested_port = port
        self._app = create_app(self.config)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def stats(self) -> FakeUpstreamStats:
        return self._app[STATS]

    @property
    def received(self) -> list[ReceivedBody]:
        """The bodies of the last 100 valid chat requests, oldest first."""
        received: deque[ReceivedBody] = self._app[RECEIVED]
        return list(received)

    @property
    def received_embeddings(self) -> list[ReceivedBody]:
        """The bodies of the last 1,000 valid embeddings requests, oldest first."""
        received: deque[ReceivedBody] = self._app[RECEIVED_EMBEDDINGS]
        return list(received)

    @property
    def base_url(self) -> str:
        """The OpenAI SDK style base URL, `/v1` included."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        if self._runner is not None:
            return
        await asyncio.to_thread(encoding)  # load the tokenizer before the first request is timed
        # handler_cancellation: a client disconnect cancels the handler at once, even while it is idle.
        runner = web.AppRunner(self._app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is None:
            return
        self._app[CLOSING].set()  # release hanging streams so shutdown does not wait for them
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_fake_upstream(
    config: FakeUpstreamConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> FakeUpstream:
    """Start a fake upstream; port 0 picks a free one (read `.port` / `.base_url`)."""
    upstream = FakeUpstream(config, host, port)
    await upstream.start()
    return upstream


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.fake_upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed at start)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per answer")
    parser.add_argument("--interval-ms", type=float, default=0.0, help="delay between content chunks")
    parser.add_argument(
        "--reply", default=None, help='fixed reply text (default: "Echo: <last user message>")'
    )
    parser.add_argument("--model", default=None, help="model named in responses (default: the requested one)")
    parser.add_argument("--api-key", default=None, help="require this Bearer token")
    parser.add_argument(
        "--fail-status", type=int, default=None, help="answer every chat request with this status"
    )
    parser.add_argument(
        "--grounded", action="store_true",
        help="answer from the prompt's numbered passages with [n], or the decline marker when none fits",
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    config = FakeUpstreamConfig(
        ttft_s=args.ttft_ms / 1000,
        chunk_count=args.chunks,
        chunk_interval_s=args.interval_ms / 1000,
        reply=args.reply,
        model=args.model,
        expected_api_key=args.api_key,
        fail_status=args.fail_status,
        grounded=args.grounded,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeUpstream(config, args.host, args.port) as upstream:
        print(f"fake upstream listening on {upstream.base_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
