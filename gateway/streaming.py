"""Opening an SSE response with the bookkeeping every stream needs (gauges, drain, shutdown)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from aiohttp import web

from gateway import keys

log = logging.getLogger(__name__)


@asynccontextmanager
async def event_stream(request: web.Request, extra_headers: Mapping[str, str] | None = None,
                       ) -> AsyncIterator[web.StreamResponse]:
    """A prepared text/event-stream response, counted while open; a client that went away ends it quietly."""
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no", "X-Request-Id": request[keys.REQUEST_ID], **(extra_headers or {})}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    state = request.app[keys.STATE]
    metrics = request.app[keys.METRICS]
    request.app[keys.OPEN_STREAMS].add(response)
    metrics.active_streams.inc()
    try:
        with state.streaming():
            yield response
            await response.write_eof()
    except ConnectionResetError:
        log.info("client went away during a stream")
    finally:
        metrics.active_streams.dec()
