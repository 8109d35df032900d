"""JSON responses with readable UTF-8 (Chinese stays Chinese, not \\u escapes)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

from aiohttp import web

dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


def json_response(data: object, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=dumps)
