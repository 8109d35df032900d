"""Live-chat phase 2: resuming a conversation after missed events, cold, warm and by one direct session call."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc

from bench.ws_frames import QUESTION, STORED, hello, recv_frame, until_pong, visitor_token
from bench.ws_idle_clients import TENANT
from bench.ws_params import RESUME_CASES, WsBenchParams
from devtools.devstack.stack import Stack
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel

log = logging.getLogger("bench.ws")


@dataclass
class Missed:
    conversation_id: str
    after_seq: int
    last_seq: int
    events: int
    sends: int


async def produce(http: aiohttp.ClientSession, url: str, token: str, events: int) -> Missed:
    """A conversation, then at least `events` more stored events in it, sent on one socket."""
    async with http.ws_connect(url) as ws:
        await hello(ws, token)
        await ws.send_str(json.dumps({"type": "send", "cid": "first", "text": QUESTION}))
        frames = await until_pong(ws)
        stored = [f for f in frames if f["type"] in STORED]
        if not stored:
            raise RuntimeError(f"the first send stored nothing: {frames[:5]}")
        conversation_id, after_seq = stored[0]["conversation_id"], max(f["seq"] for f in stored)
        count, sends, last_seq = 0, 0, after_seq
        while count < events:
            sends += 1
            await ws.send_str(json.dumps({"type": "send", "cid": f"m-{sends}", "conversation_id": conversation_id,
                                          "text": f"{QUESTION} #{sends}"}))
            for frame in await until_pong(ws):
                if frame["type"] in ("nack", "error"):
                    raise RuntimeError(f"producing events: {frame}")
                if frame["type"] in STORED and frame["seq"] > last_seq:
                    count += 1
                    last_seq = frame["seq"]
        return Missed(conversation_id, after_seq, last_seq, count, sends)


async def timed_resume(http: aiohttp.ClientSession, url: str, token: str, missed: Missed) -> float:
    """Seconds from sending hello{resume} to the last missed event; checks none is missing or twice."""
    async with http.ws_connect(url) as ws:
        started = time.perf_counter()
        await ws.send_str(json.dumps({"type": "hello", "token": token, "resume": [
            {"conversation_id": missed.conversation_id, "after_seq": missed.after_seq}]}))
        seqs: list[int] = []
        while True:
            frame = await recv_frame(ws)
            if frame["type"] == "welcome":
                if frame["resume"] != [{"conversation_id": missed.conversation_id, "result": "ok"}]:
                    raise RuntimeError(f"resume refused: {frame}")
            elif frame["type"] in STORED and frame["seq"] > missed.after_seq:
                seqs.append(frame["seq"])
                if frame["seq"] >= missed.last_seq:
                    break
            elif frame["type"] in ("resync", "error", "nack"):
                raise RuntimeError(f"resume failed: {frame}")
        elapsed = time.perf_counter() - started
    if len(seqs) != missed.events or seqs != sorted(set(seqs)):
        raise RuntimeError(f"resume replayed {len(seqs)} events (want {missed.events}), in order: "
                           f"{seqs == sorted(seqs)}")
    return elapsed


async def direct_read(session_addr: str, token: str, sub: str, missed: Missed) -> float:
    """The direct path: one ListMessages call to the session service (all kept messages)."""
    async with internal_channel(session_addr, token) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        request = session_pb2.ListMessagesRequest(
            principal=session_pb2.Principal(tenant=TENANT, subject=sub, role="visitor"),
            session_id=missed.conversation_id)
        await stub.ListMessages(request, timeout=10)  # the channel connects outside the timing
        started = time.perf_counter()
        reply = await stub.ListMessages(request, timeout=10)
        elapsed = time.perf_counter() - started
    got = sum(1 for m in reply.messages if m.seq > missed.after_seq)
    if got < missed.events:
        log.warning("ListMessages returned %d of the %d missed events", got, missed.events)
    return elapsed


async def resume_phase(params: WsBenchParams, stack: Stack, secret: str) -> dict[str, Any]:
    url = f"{stack.base_url}/v1/ws"
    session_addr = f"127.0.0.1:{stack.config.ports.session}"
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for events in params.resume_events:
            sub = f"resume-{events}-{secrets.token_hex(3)}"
            token = visitor_token(secret, sub)
            started = time.perf_counter()
            missed = await produce(http, url, token, events)
            log.info("resume %d: %d stored events from %d sends in %.1f s", events, missed.events, missed.sends,
                     time.perf_counter() - started)
            row: dict[str, Any] = {"events": missed.events, "sends": missed.sends}
            await asyncio.sleep(0.5)  # the producer's feed on the edge is gone: the first case is cold
            for case in RESUME_CASES:
                try:
                    times = await resume_case(case, params.resume_rounds, http, url, token, missed, session_addr,
                                              stack.config.internal_token, sub)
                except (RuntimeError, ConnectionError, TimeoutError, aiohttp.ClientError, grpc.RpcError) as error:
                    log.error("resume %d %s failed: %s", events, case, error)
                    row[f"{case}_error"] = f"{type(error).__name__}: {error}"
                    continue
                row[f"{case}_ms"] = [t * 1000 for t in times]
                row[f"{case}_median_ms"] = statistics.median(times) * 1000
            results[str(events)] = row
    return results


async def resume_case(case: str, rounds: int, http: aiohttp.ClientSession, url: str, token: str, missed: Missed,
                      session_addr: str, internal_token: str, sub: str) -> list[float]:
    if case == "direct":
        return [await direct_read(session_addr, internal_token, sub, missed) for _ in range(rounds)]
    if case == "cold":
        times = []
        for _ in range(rounds):
            times.append(await timed_resume(http, url, token, missed))
            await asyncio.sleep(0.3)  # its feed closes with the socket: the next one is cold again
        return times
    # warm: another tab keeps the conversation's feed open on this edge meanwhile (and reads its frames).
    async with http.ws_connect(url) as tab:
        await hello(tab, token, resume=[{"conversation_id": missed.conversation_id, "after_seq": missed.last_seq}])
        drain = asyncio.create_task(_drain(tab))
        try:
            return [await timed_resume(http, url, token, missed) for _ in range(rounds)]
        finally:
            drain.cancel()


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass
