"""The wire of an OpenAI-compatible Chat Completions stream: its server-sent events, its chunks, its error
bodies and the waits an upstream asks for. Pure parsing, no I/O: plugins/openai_compatible.py does the HTTP."""

from __future__ import annotations

import contextlib
import email.utils
import json
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.llm_worker.plugin_api import ProviderError

LINE_END = re.compile(rb"\r\n|\r|\n")


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
        while match := LINE_END.search(self._buffer, start):
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
class StreamState:
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
        chunk = loads_object(data)
        if chunk.get("error"):
            raise ProviderError(
                f"upstream reported an error mid-stream: {error_text(chunk) or 'no message'}", retryable=True
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


def loads_object(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ProviderError("upstream sent a malformed stream event (not a JSON object)", retryable=True)
    return value


def error_text(body: object) -> str:
    """The message of an error body: OpenAI `{"error": {"message"}}`, vLLM `{"message"}`, `{"detail"}`."""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "")
    if isinstance(error, str):
        return error
    return str(body.get("message") or body.get("detail") or "")
