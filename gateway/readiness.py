"""The backends' readiness as /readyz reports it: asked at most once a second, whoever asks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

TTL_S = 1.0
"""How long one round of health checks answers /readyz (issue 17: a /readyz flood made three gRPC
calls per request). A backend that goes down shows within TTL_S plus one round's timeout."""


class Readiness:
    def __init__(self, check: Callable[[], Awaitable[dict[str, bool]]], *, ttl_s: float = TTL_S,
                 on_round: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self._check = check
        self._ttl_s = ttl_s
        self._on_round = on_round
        self._clock = clock
        self._answer: dict[str, bool] | None = None
        self._answered_at = 0.0
        self._round: asyncio.Task[dict[str, bool]] | None = None

    async def backends(self) -> dict[str, bool]:
        """{backend: SERVING?}, at most TTL_S old; callers while a round runs all wait for that one."""
        if self._answer is not None and self._clock() - self._answered_at < self._ttl_s:
            return self._answer
        if self._round is None:
            self._round = asyncio.create_task(self._run_round(), name="readiness-round")
        # Shielded: a prober that hangs up cancels its handler, not the round the others wait for.
        return dict(await asyncio.shield(self._round))

    async def _run_round(self) -> dict[str, bool]:
        try:
            self._on_round()
            answer = await self._check()
            self._answer, self._answered_at = answer, self._clock()
            return answer
        finally:
            self._round = None

    async def aclose(self) -> None:
        if self._round is not None:
            self._round.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._round
