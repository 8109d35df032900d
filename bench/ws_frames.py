"""WebSocket frames a live-chat bench client sends and reads: hello, ping until pong, tokens, ms summaries."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from typing import Any

import aiohttp

from bench.loadgen import percentile
from bench.ws_idle_clients import TENANT
from devtools.mint_token import mint

QUESTION = "下单后多久发货？"
"""A question the knowledge base answers, so the AI stores an answer and no handoff starts."""
FRAME_TIMEOUT_S = 30.0
STORED = frozenset({"msg", "state", "note"})


async def recv_frame(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout_s)
    if message.type is not aiohttp.WSMsgType.TEXT:
        raise ConnectionError(f"socket closed ({message.type.name}, code {ws.close_code}): {message.data!r}")
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def hello(ws: aiohttp.ClientWebSocketResponse, token: str, **fields: Any) -> dict[str, Any]:
    await ws.send_str(json.dumps({"type": "hello", "token": token, **fields}))
    welcome = await recv_frame(ws)
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome}")
    return welcome


async def until_pong(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Ask `ping` and collect every frame before the `pong`: frames are handled in order, so a
    turn started by an earlier `send` has ended (its answer stored) when the pong comes."""
    await ws.send_str('{"type": "ping"}')
    frames: list[dict[str, Any]] = []
    while (frame := await recv_frame(ws))["type"] != "pong":
        frames.append(frame)
    return frames


def visitor_token(secret: str, sub: str) -> str:
    return mint(secret, tenant=TENANT, subject=sub, role="visitor", ttl_s=6 * 3600)


def agent_token(secret: str, sub: str) -> str:
    return mint(secret, tenant=TENANT, subject=sub, role="agent", ttl_s=6 * 3600)


def summary_ms(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values), "mean": statistics.fmean(values)}
