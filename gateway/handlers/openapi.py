"""GET /openapi.json: the repository's OpenAPI document, with this edge's configured limits filled in."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from aiohttp import web

from gateway import keys

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "openapi.json"
LIMIT_MARKER = "x-kefu-limit"
"""Schemas whose `maxLength` is a setting carry this key naming the GatewaySettings field."""


def load_document(limits: dict[str, int] | None = None) -> dict[str, object]:
    """The document as kept in the repository, with every `x-kefu-limit` maxLength set from `limits`."""
    document: dict[str, object] = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    if limits:
        _apply_limits(document, limits)
    return document


def _apply_limits(node: object, limits: dict[str, int]) -> None:
    if isinstance(node, dict):
        name = node.get(LIMIT_MARKER)
        if isinstance(name, str) and name in limits:
            node["maxLength"] = limits[name]
        for value in node.values():
            _apply_limits(value, limits)
    elif isinstance(node, list):
        for value in node:
            _apply_limits(value, limits)


@functools.lru_cache(maxsize=4)
def _document_bytes(max_message_chars: int) -> bytes:
    # Read once per distinct setting, not per request; the file does not change under a running edge.
    document = load_document({"max_message_chars": max_message_chars})
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


async def openapi_document(request: web.Request) -> web.Response:
    body = _document_bytes(request.app[keys.SETTINGS].max_message_chars)
    return web.Response(body=body, content_type="application/json", charset="utf-8")
