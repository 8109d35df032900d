"""Live-chat phase 3: visitor-to-agent latency at an open-loop rate, with CPU per delivered message."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.arrivals import arrival_offsets
from bench.proc_stats import cpu_seconds, machine_busy_seconds
from bench.ws_frames import (
    FRAME_TIMEOUT_S,
    QUESTION,
    STORED,
    agent_token,
    hello,
    recv_frame,
    summary_ms,
    until_pong,
    visitor_token,
)
from bench.ws_params import WsBenchParams

log = logging.getLogger("bench.ws")


QUIET_S = 10.0
"""The latency run stops waiting for queued messages after this long without one arriving."""
IDLE_WINDOW_S = 3.0
"""Before sending, the latency run measures the CPU of the idle set-up for this long."""


@dataclass
class LatencyRun:
    sent: dict[int, float] = field(default_factory=dict)
    received: dict[int, float] = field(default_factory=dict)
    echoed: dict[int, float] = field(default_factory=dict)
    """When the sender's own socket got the stored `msg` back (the same edge: splits the path)."""
    acked: dict[int, float] = field(default_factory=dict)
    duplicates: int = 0
    ai_frames: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    lag: list[float] = field(default_factory=list)
    pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    """Claims awaiting their ack or nack, by cid (the agents' readers resolve them)."""


async def open_visitor(http: aiohttp.ClientSession, url: str, mode: str, secret: str,
                       number: int) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    ws = await http.ws_connect(url)
    if mode == "floor":
        conversation_id = f"room-{number}"
        await ws.send_str(json.dumps({"type": "hello", "conversation_id": conversation_id}))
        await recv_frame(ws)
        return ws, conversation_id
    await hello(ws, visitor_token(secret, f"latency-{number}-{secrets.token_hex(3)}"))
    await ws.send_str(json.dumps({"type": "send", "cid": "start", "text": QUESTION}))
    frames = await until_pong(ws)
    conversation_id = next(f["conversation_id"] for f in frames if f["type"] in STORED)
    # To the queue, so that an agent may claim it (the AI stays silent from then on).
    await ws.send_str(json.dumps({"type": "handoff", "conversation_id": conversation_id, "cid": "handoff"}))
    for frame in await until_pong(ws):
        if frame["type"] == "nack":
            log.warning("handoff refused: %s", frame)
    return ws, conversation_id


async def claim(ws: aiohttp.ClientWebSocketResponse, run: LatencyRun, conversation_id: str, cid: str) -> str | None:
    """Claim a conversation; None when acknowledged, else what went wrong. The agent's reader,
    already running, hands over the answer: nobody's frames wait unread meanwhile."""
    answer = run.pending[cid] = asyncio.get_running_loop().create_future()
    await ws.send_str(json.dumps({"type": "claim", "conversation_id": conversation_id, "cid": cid}))
    try:
        frame = await asyncio.wait_for(answer, FRAME_TIMEOUT_S)
    except TimeoutError:
        return "no answer"
    finally:
        run.pending.pop(cid, None)
    return None if frame["type"] == "ack" else f"{frame.get('code')}: {frame.get('message')}"


async def read_counting_failures(reader: Callable[[aiohttp.ClientWebSocketResponse, LatencyRun], Awaitable[None]],
                                 ws: aiohttp.ClientWebSocketResponse, run: LatencyRun, who: str) -> None:
    """Run one socket's reader; a socket that fails is counted among the problems, not raised."""
    try:
        await reader(ws, run)
    except (aiohttp.ClientError, ConnectionError) as error:
        run.problems[f"{who} socket: {type(error).__name__}"] += 1


async def _read_visitor(ws: aiohttp.ClientWebSocketResponse, run: LatencyRun) -> None:
    async for message in ws:
        if message.type is not aiohttp.WSMsgType.TEXT:
            break
        now = time.perf_counter()
        frame = json.loads(message.data)
        kind = frame["type"]
        if kind == "msg" and frame["sender"]["type"] == "visitor" and frame["text"].startswith("bench-"):
            run.echoed.setdefault(int(frame["text"].split(" ", 1)[0].removeprefix("bench-")), now)
        elif kind == "ack" and str(frame.get("cid", "")).startswith("b-"):
            run.acked.setdefault(int(frame["cid"].removeprefix("b-")), now)
        elif kind == "ai_delta" or kind == "msg" and frame["sender"]["type"] == "ai":
            run.ai_frames += 1
        elif kind in ("nack", "error"):
            run.problems[f"visitor {kind} {frame.get('code')}: {frame.get('message')}"] += 1
    if ws.close_code not in (None, 1000):
        run.problems[f"visitor socket closed {ws.close_code}"] += 1


async def _read_agent(ws: aiohttp.ClientWebSocketResponse, run: LatencyRun) -> None:
    async for message in ws:
        if message.type is not aiohttp.WSMsgType.TEXT:
            break
        now = time.perf_counter()
        frame = json.loads(message.data)
        if frame["type"] in ("ack", "nack") and frame.get("cid") in run.pending:
            run.pending[frame["cid"]].set_result(frame)
        elif frame["type"] == "msg" and frame["sender"]["type"] == "visitor" and frame["text"].startswith("bench-"):
            number = int(frame["text"].split(" ", 1)[0].removeprefix("bench-"))
            if number in run.received:
                run.duplicates += 1
            else:
                run.received[number] = now
        elif frame["type"] in ("nack", "error"):
            run.problems[f"agent {frame['type']} {frame.get('code')}: {frame.get('message')}"] += 1
    if ws.close_code not in (None, 1000):
        run.problems[f"agent socket closed {ws.close_code}"] += 1


async def latency_run(params: WsBenchParams, mode: str, visitor_url: str, agent_url: str, secret: str,
                      pids: dict[str, int]) -> dict[str, Any]:
    run = LatencyRun()
    run_id = secrets.token_hex(3)  # fresh agents each run: an agent's sockets follow every conversation it holds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        gate = asyncio.Semaphore(20)

        readers: list[asyncio.Task[None]] = []

        async def one_visitor(number: int) -> tuple[aiohttp.ClientWebSocketResponse, str]:
            async with gate:
                ws, conversation_id = await open_visitor(http, visitor_url, mode, secret, number)
            # Read from now on: queue positions and state changes keep coming while others set up,
            # and a socket left unread is (rightly) closed as too slow.
            readers.append(asyncio.create_task(read_counting_failures(_read_visitor, ws, run, "visitor")))
            return ws, conversation_id

        visitors = await asyncio.gather(*(one_visitor(n) for n in range(params.visitors)))
        agents = []
        for number in range(params.agents):
            ws = await http.ws_connect(agent_url)
            if mode == "kefu":
                await hello(ws, agent_token(secret, f"bench-agent-{number}-{run_id}"))
            else:
                await ws.send_str('{"type": "hello"}')
                await recv_frame(ws)
            agents.append(ws)
            readers.append(asyncio.create_task(read_counting_failures(_read_agent, ws, run, "agent")))
        claim_failures: Counter[str] = Counter(filter(None, await asyncio.gather(*(
            claim(agents[number % len(agents)], run, conversation_id, f"claim-{number}")
            for number, (_, conversation_id) in enumerate(visitors)))))
        if claim_failures:
            log.warning("%s: claims refused: %s", mode, dict(claim_failures))
        total = int((params.warmup_s + params.duration_s) * params.rate)
        warmup = int(params.warmup_s * params.rate)
        pids = {**pids, "client": os.getpid()}
        # The CPU the set-up conversations cost with nothing sent (heartbeats, timers, idle feeds):
        # what per-message figures include besides the messages themselves.
        idle_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        await asyncio.sleep(IDLE_WINDOW_S)
        idle_cpu = {name: round(((cpu_seconds(pid) or 0.0) - before) * 100 / IDLE_WINDOW_S)
                    for name, pid in pids.items() if (before := idle_before[name]) is not None}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        busy_before = machine_busy_seconds()
        # Open loop: each message leaves on its own schedule, however long earlier ones take to arrive.
        offsets = arrival_offsets(params.rate, count=total)
        started = time.perf_counter()
        for number in range(total):
            due = started + offsets[number]
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            ws, conversation_id = visitors[number % len(visitors)]
            now = time.perf_counter()
            run.lag.append((now - due) * 1000)
            if ws.closed:
                run.problems["send on a socket the server had closed"] += 1
                continue
            run.sent[number] = now
            frame = {"type": "send", "cid": f"b-{number}", "conversation_id": conversation_id,
                     "text": f"bench-{number} 您好，请问我的订单到哪了？"}
            try:
                await ws.send_str(json.dumps(frame, ensure_ascii=False))
            except (aiohttp.ClientError, ConnectionError):
                run.problems["send on a socket the server had closed"] += 1
        sending_s = time.perf_counter() - started
        # Wait for what is still queued, as long as it keeps arriving (a backlog drains at the
        # delivered rate); give up after QUIET_S without progress.
        progress, quiet_since = len(run.received), time.monotonic()
        while len(run.received) < total and time.monotonic() - quiet_since < QUIET_S:
            await asyncio.sleep(0.05)
            if len(run.received) > progress:
                progress, quiet_since = len(run.received), time.monotonic()
        steady_s = time.perf_counter() - started
        cpu = {name: (cpu_seconds(pid) or 0.0) - before for name, pid in pids.items()
               if (before := cpu_before[name]) is not None}
        busy_after = machine_busy_seconds()
        if busy_before is not None and busy_after is not None:
            # What the rest of the machine (other work on a shared box) took meanwhile.
            cpu["others"] = max(0.0, busy_after - busy_before - sum(cpu.values()))
        delivered = len(run.received)
        # Arrivals from here on (frames flushed before the close frames) are not counted.
        counted = dict(run.received)
        for ws in [*(v for v, _ in visitors), *agents]:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
        run.received = counted
    measured = [(run.received[n] - run.sent[n]) * 1000 for n in range(warmup, total) if n in run.received]
    # Median latency per second of sending (warm-up included): a queue that grows, drains or stays.
    by_second: dict[int, list[float]] = {}
    for n, sent in run.sent.items():
        if n in run.received:
            by_second.setdefault(int(n / params.rate), []).append((run.received[n] - sent) * 1000)
    timeline = [round(statistics.median(by_second[second]), 1) for second in sorted(by_second)]
    echo = [(run.echoed[n] - run.sent[n]) * 1000 for n in range(warmup, total) if n in run.echoed and n in run.sent]
    ack = [(run.acked[n] - run.sent[n]) * 1000 for n in range(warmup, total) if n in run.acked and n in run.sent]
    return {
        "mode": mode, "offered_rate": params.rate, "messages": total - warmup, "warmup_messages": warmup,
        "received": len(measured), "lost": (total - warmup) - len(measured), "duplicates": run.duplicates,
        "achieved_rate": total / sending_s if sending_s else None,
        "delivered_rate": _delivered_rate(run),
        "latency_ms": summary_ms(measured), "sender_lag_ms": summary_ms(run.lag[warmup:]),
        "own_echo_ms": summary_ms(echo), "ack_ms": summary_ms(ack), "median_ms_by_second": timeline,
        "client_cpu_percent": cpu["client"] * 100 / steady_s if "client" in cpu else None,
        "cpu_percent": {name: round(seconds * 100 / steady_s) for name, seconds in cpu.items()},
        "idle_cpu_percent": idle_cpu,
        "cpu_ms_per_message": {name: round(seconds * 1000 / delivered, 3)
                               for name, seconds in cpu.items() if name != "others" and delivered},
        "claims_refused": dict(claim_failures), "ai_frames_to_visitors": run.ai_frames,
        "problems": dict(run.problems),
    }


def _delivered_rate(run: LatencyRun) -> float | None:
    """Messages the agents got per second, from the first send to the last arrival."""
    if len(run.received) < 2 or not run.sent:
        return None
    span = max(run.received.values()) - min(run.sent.values())
    return len(run.received) / span if span > 0 else None
