"""Server-sent events framing (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping


def sse_event(event: str, data: Mapping[str, object]) -> bytes:
    """One `event:`/`data:` frame; JSON never contains a raw newline, so one data line suffices."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def sse_data(data: Mapping[str, object] | str) -> bytes:
    """A bare `data:` frame, as the OpenAI wire format uses."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
