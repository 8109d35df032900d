"""Issue 17 item 3: one visitor cannot fill the disk nor hold many sockets; one tenant cannot take another's storage.

The stack runs with the default per-visitor limits (1 message/s, burst 10, 5 sockets, 5 open conversations)
and small storage figures, so a quota is reached in a few requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, start_stack, token

BURST = 10
RPS = 1.0
QUOTA = 32 * 1024
BIG_TEXT = "hello there " * 580
"""About 7 KB stored a message: a tenant's quota lasts a handful of them."""
DEFAULT_LIMITS = {"KEFU_VISITOR_MSG_RPS": str(RPS), "KEFU_VISITOR_MSG_BURST": str(BURST),
                  "KEFU_VISITOR_MAX_SOCKETS": "5", "KEFU_VISITOR_MAX_CONVERSATIONS": "5"}
"""The defaults, said again: start_stack lifts them for functional tests."""
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("sec-flood"), {
        **DEFAULT_LIMITS, "KEFU_TENANT_MAX_STORED_BYTES": str(QUOTA), "KEFU_MESSAGES_MAX_BYTES": str(64 * QUOTA)})
    try:
        yield started
    finally:
        started.stop()


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 10.0) -> dict[str, Any] | int:
    """The next frame, or the close code once the server closed."""
    message = await ws.receive(timeout=timeout_s)
    if message.type in CLOSED:
        return ws.close_code or 0
    assert message.type is aiohttp.WSMsgType.TEXT, message
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def connect(http: aiohttp.ClientSession, stack: Stack, tenant: str, sub: str,
                  ) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any] | int]:
    ws = await http.ws_connect(f"{stack.base_url}/v1/ws")
    await ws.send_json({"type": "hello", "token": token(tenant, sub)})
    return ws, await receive(ws)


async def answer_to(ws: aiohttp.ClientWebSocketResponse, cid: str) -> dict[str, Any]:
    """The ack or nack of the send `cid` (other frames on the way are skipped)."""
    while True:
        frame = await receive(ws)
        assert isinstance(frame, dict), f"closed {frame}"
        if frame["type"] in ("ack", "nack") and frame.get("cid") == cid:
            return frame


async def moderation_checks(http: aiohttp.ClientSession, stack: Stack) -> float:
    async with http.get(f"http://127.0.0.1:{stack.config.ports.moderation_metrics}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kefu_moderation_checks_total{"))


async def stored_visitor_messages(http: aiohttp.ClientSession, stack: Stack, tenant: str, sub: str,
                                  conversation_id: str) -> int:
    async with http.get(f"{stack.base_url}/v1/sessions/{conversation_id}/messages",
                        headers=auth(tenant, sub)) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return sum(1 for m in body["messages"] if m["role"] == "user")


async def test_sec_a_flood_over_several_sockets_stores_only_the_burst(stack: Stack) -> None:
    tenant, sub = "flood", "flooder"
    async with aiohttp.ClientSession() as http:
        sockets = []
        for _ in range(3):
            ws, welcome = await connect(http, stack, tenant, sub)
            assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
            sockets.append(ws)
        # A human is asked for first: then every message is stored without any model cost.
        await sockets[0].send_json({"type": "send", "cid": "start", "text": "转人工"})
        conversation_id = ""
        while True:
            frame = await receive(sockets[0])
            assert isinstance(frame, dict), frame
            if frame["type"] == "msg" and frame.get("cid") == "start":
                conversation_id = frame["conversation_id"]
            if frame["type"] in ("ack", "nack"):
                assert frame["type"] == "ack" and conversation_id, frame
                break
        started = time.monotonic()

        async def flood(index: int, ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
            answers = []
            for n in range(15):
                cid = f"f{index}-{n}"
                await ws.send_json({"type": "send", "cid": cid, "conversation_id": conversation_id,
                                    "text": f"spam {index} {n}"})
                answers.append(await answer_to(ws, cid))
            return answers

        results = await asyncio.gather(*(flood(i, ws) for i, ws in enumerate(sockets)))
        elapsed = time.monotonic() - started
        answers = [a for per_socket in results for a in per_socket]
        acks = [a for a in answers if a["type"] == "ack"]
        nacks = [a for a in answers if a["type"] == "nack"]
        assert len(acks) + len(nacks) == 45
        assert nacks and {(n["code"], n["request_type"]) for n in nacks} == {("limit", "send")}, nacks[:3]
        assert not any(a["duplicate"] for a in acks)
        # The burst (less the first message) and what refilled meanwhile; no more.
        assert len(acks) <= BURST - 1 + int(elapsed * RPS) + 1, (len(acks), elapsed)

        # /v1/chat turns draw on the same bucket: 429 with Retry-After, never a 5xx.
        refusal = None
        for n in range(5):
            async with http.post(f"{stack.base_url}/v1/chat", headers=auth(tenant, sub), json={
                    "message": f"more {n}", "session_id": conversation_id, "stream": False}) as response:
                assert response.status in (200, 429), (response.status, await response.text())
                if response.status == 429:
                    refusal = (await response.json())["error"]["code"], int(response.headers["Retry-After"])
                    break
        assert refusal is not None and refusal[0] == "rate_limited" and refusal[1] >= 1, refusal
        # Held at the edge until then: more turns are refused without a moderation (or session) call.
        checks = await moderation_checks(http, stack)
        for _ in range(5):
            async with http.post(f"{stack.base_url}/v1/chat", headers=auth(tenant, sub), json={
                    "message": "more", "session_id": conversation_id, "stream": False}) as response:
                assert response.status == 429 and "Retry-After" in response.headers
        assert await moderation_checks(http, stack) == checks
        stored = await stored_visitor_messages(http, stack, tenant, sub, conversation_id)
        assert stored == len(acks) + 1 + n, (stored, len(acks), n)

        # Another visitor of the same tenant is not slowed down by the flood.
        other, welcome = await connect(http, stack, tenant, "bystander")
        assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
        for n in range(3):
            await other.send_json({"type": "send", "cid": f"b{n}", "text": "转人工" if n == 0 else f"hello {n}"})
            assert (await answer_to(other, f"b{n}"))["type"] == "ack"
        for ws in [*sockets, other]:
            await ws.close()


async def test_sec_a_sixth_socket_of_a_visitor_is_refused(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        sockets = []
        for _ in range(5):
            ws, welcome = await connect(http, stack, "flood", "many-sockets")
            assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
            sockets.append(ws)
        sixth, refused = await connect(http, stack, "flood", "many-sockets")
        assert isinstance(refused, dict) and refused["type"] == "error" and refused["code"] == "limit", refused
        assert await receive(sixth) == 4008
        # Another visitor is not counted against this one.
        other, welcome = await connect(http, stack, "flood", "few-sockets")
        assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
        # A closed socket frees its place.
        await sockets.pop().close()
        for _ in range(50):
            again, answer = await connect(http, stack, "flood", "many-sockets")
            if isinstance(answer, dict) and answer["type"] == "welcome":
                break
            await again.close()
            await asyncio.sleep(0.05)
        assert isinstance(answer, dict) and answer["type"] == "welcome", answer
        for ws in [*sockets, other, again]:
            await ws.close()


async def test_sec_a_visitor_closed_for_a_frame_flood_cannot_reconnect_at_once(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws, welcome = await connect(http, stack, "flood", "pinger")
        assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
        for _ in range(100):  # over KEFU_WS_FRAME_BURST (60) at once
            await ws.send_json({"type": "ping"})
        while (frame := await receive(ws)) != 4008:
            assert isinstance(frame, dict) and frame["type"] in ("pong", "error"), frame
        again, refused = await connect(http, stack, "flood", "pinger")
        assert isinstance(refused, dict) and refused["type"] == "error" and refused["code"] == "limit", refused
        assert await receive(again) == 4008
        other, welcome = await connect(http, stack, "flood", "calm")
        assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
        await other.close()


async def test_sec_a_socket_follows_at_most_its_conversations(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{stack.base_url}/v1/ws")
        resume = [{"conversation_id": f"{n:032x}", "after_seq": 0} for n in range(6)]
        await ws.send_json({"type": "hello", "token": token("flood", "follower"), "resume": resume})
        refused = await receive(ws)
        assert isinstance(refused, dict) and refused["type"] == "error" and refused["code"] == "limit", refused
        assert await receive(ws) == 4008


async def test_sec_a_visitor_cannot_open_conversations_without_end(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        statuses = []
        for n in range(6):
            async with http.post(f"{stack.base_url}/v1/chat", json={"message": f"question {n}", "stream": False},
                                 headers=auth("flood", "opener")) as response:
                statuses.append((response.status, (await response.json()).get("error", {}).get("code")))
        assert statuses[:5] == [(200, None)] * 5, statuses
        assert statuses[5] == (409, "quota_exceeded"), statuses


async def test_sec_a_tenant_over_its_quota_gets_a_clear_error_while_another_still_writes(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        session_id = None
        outcomes: list[tuple[int, str | None]] = []
        for _ in range(8):
            body: dict[str, Any] = {"message": BIG_TEXT, "stream": False}
            if session_id:
                body["session_id"] = session_id
            async with http.post(f"{stack.base_url}/v1/chat", json=body, headers=auth("greedy", "filler")) as response:
                payload = await response.json()
                outcomes.append((response.status, payload.get("error", {}).get("code")))
                session_id = session_id or payload.get("session_id")
        stored = sum(1 for status, _ in outcomes if status == 200)
        assert 0 < stored * len(BIG_TEXT) <= QUOTA, outcomes
        assert (409, "quota_exceeded") in outcomes and (500, "internal") not in outcomes, outcomes
        assert all(status in (200, 409) for status, _ in outcomes), outcomes
        # A WebSocket visitor of that tenant is told so with a `limit` nack.
        ws, welcome = await connect(http, stack, "greedy", "late-visitor")
        assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
        await ws.send_json({"type": "send", "cid": "q1", "text": BIG_TEXT})
        nack = await answer_to(ws, "q1")
        assert nack["type"] == "nack" and nack["code"] == "limit" and "quota" in nack["message"], nack
        await ws.close()
        # Another tenant writes as before.
        async with http.post(f"{stack.base_url}/v1/chat", json={"message": BIG_TEXT, "stream": False},
                             headers=auth("modest", "writer")) as response:
            assert response.status == 200, await response.text()


async def test_sec_a_full_log_refuses_writes_with_a_clear_error_and_the_edge_stays_ready(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tenants' quotas sum to more than the log holds: it fills, and says so instead of dropping history.
    small = start_stack(tmp_path_factory.mktemp("sec-full"), {
        **DEFAULT_LIMITS, "KEFU_TENANT_MAX_STORED_BYTES": str(QUOTA // 2), "KEFU_MESSAGES_MAX_BYTES": str(QUOTA)})
    try:
        outcomes: list[tuple[int, str | None]] = []
        async with aiohttp.ClientSession() as http:
            for n in range(8):  # each tenant well within its quota; together more than the log holds
                async with http.post(f"{small.base_url}/v1/chat", headers=auth(f"t{n}", "v"),
                                     json={"message": BIG_TEXT, "stream": False}) as response:
                    payload = await response.json()
                    outcomes.append((response.status, payload.get("error", {}).get("code")))
            assert (507, "storage_full") in outcomes, outcomes
            assert {status for status, _ in outcomes} <= {200, 409, 507}, outcomes
            async with http.get(f"{small.base_url}/readyz") as response:
                assert response.status == 200
            # What was stored stays readable.
            async with http.get(f"{small.base_url}/v1/conversations?status=ai",
                                headers=auth("t1", "boss", "agent")) as response:
                assert response.status == 200 and (await response.json())["conversations"]
    finally:
        small.stop()
