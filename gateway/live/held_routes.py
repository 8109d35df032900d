"""The HTTP chat routes honour the same message holds as the WebSocket (gateway/live/holds.py)."""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import keys
from gateway.errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def held_visitors(handler: Handler) -> Handler:
    """A visitor the session service found over its message rate gets 429 here until its Retry-After,
    before any moderation or session call; the first refusal from the session starts the hold."""

    @functools.wraps(handler)
    async def held(request: web.Request) -> web.StreamResponse:
        principal = request[keys.REQUEST_PRINCIPAL]
        holds = request.app[keys.LIVE].message_holds
        left = holds.held_for(principal) if principal.is_visitor else 0.0
        if left:
            retry_after = str(math.ceil(left))
            raise ApiError("rate_limited", f"too many messages; retry in {retry_after} s", 429,
                           headers={"Retry-After": retry_after})
        try:
            return await handler(request)
        except ApiError as error:
            if error.code == "rate_limited" and principal.is_visitor and "Retry-After" in error.headers:
                holds.hold(principal, float(error.headers["Retry-After"]))
            raise

    return held
