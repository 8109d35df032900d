"""GET /v1/ws through the real processes: visitor hello, send, AI answer, resume, refusals and close codes.

Order a sender sees for one `send` (what the edge guarantees): its own `msg` echo, then the
`ack` (sent once the stored message came back from the conversation's log), then the
`ai_delta` frames, then the AI's stored `msg`.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, token

QUESTION = "下单后多久发货？"
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


async def open_ws(http: aiohttp.ClientSession, stack: Stack,
                  headers: dict[str, str] | None = None) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(f"{stack.base_url}/v1/ws", headers=headers, autoping=True)


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 10.0) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout_s)
    assert message.type is aiohttp.WSMsgType.TEXT, (message.type, message.data)
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def recv_until_ai_msg(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while True:
        frames.append(await recv(ws))
        if frames[-1]["type"] == "msg" and frames[-1]["sender"]["type"] == "ai":
            return frames
        assert frames[-1]["type"] not in ("error", "nack"), frames[-1]


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, list[dict[str, Any]]]:
    """Frames received until the server closed, and its close code."""
    frames: list[dict[str, Any]] = []
    while True:
        message = await ws.receive(timeout=10)
        if message.type in CLOSED:
            return ws.close_code, frames
        frames.append(json.loads(message.data))


async def hello(ws: aiohttp.ClientWebSocketResponse, **fields: Any) -> dict[str, Any]:
    await ws.send_json({"type": "hello", **fields})
    welcome = await recv(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome


async def send_and_answer(ws: aiohttp.ClientWebSocketResponse, cid: str, text: str = QUESTION,
                          **fields: Any) -> list[dict[str, Any]]:
    await ws.send_json({"type": "send", "cid": cid, "text": text, **fields})
    return await recv_until_ai_msg(ws)


async def test_ws_send_gets_echo_ack_deltas_then_the_stored_answer(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, auth(sub="ws-order") | {"X-Request-Id": "ws-order-request-1"})
        assert ws._response.headers["X-Request-Id"] == "ws-order-request-1"  # the 101 answer
        welcome = await hello(ws)
        assert welcome["conversation_id"] is None and welcome["status"] == "ai" and welcome["resume"] == []
        assert welcome["heartbeat_s"] > 0 and isinstance(welcome["epoch"], int)
        frames = await send_and_answer(ws, "c-1")
        echo, ack, *deltas, answer = frames
        conversation_id = echo["conversation_id"]
        assert echo["type"] == "msg" and echo["cid"] == "c-1" and echo["text"] == QUESTION
        assert echo["sender"] == {"type": "visitor", "id": "ws-order"} and echo["ts"] > 0
        assert ack == {"type": "ack", "cid": "c-1", "seq": echo["seq"], "duplicate": False}
        assert deltas and {d["type"] for d in deltas} == {"ai_delta"}
        assert {(d["conversation_id"], d["message_id"]) for d in deltas} == {(conversation_id, answer["message_id"])}
        assert answer["text"] == "".join(d["delta"] for d in deltas) and "发货" in answer["text"]
        assert answer["conversation_id"] == conversation_id and answer["seq"] > echo["seq"]
        # One conversation model: the socket's conversation is a session like any other.
        async with http.get(f"{kb_stack.base_url}/v1/sessions/{conversation_id}/messages",
                            headers=auth(sub="ws-order")) as response:
            assert response.status == 200
            listed = (await response.json())["messages"]
        assert [(m["id"], m["role"], m["content"]) for m in listed] == [
            (echo["message_id"], "user", QUESTION), (answer["message_id"], "assistant", answer["text"])]
        # The next send without conversation_id continues the same conversation.
        second = await send_and_answer(ws, "c-2", "怎么退货？")
        assert {f["conversation_id"] for f in second if "conversation_id" in f} == {conversation_id}
        await ws.close()


async def test_ws_token_in_the_first_frame_and_ping(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack)
        await hello(ws, token=token(sub="ws-browser"))
        await ws.send_json({"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        # Typing into a conversation the socket does not follow is refused, not relayed.
        await ws.send_json({"type": "typing", "conversation_id": "x", "on": True})
        nack = await recv(ws)
        assert (nack["type"], nack["request_type"], nack["code"]) == ("nack", "typing", "forbidden")
        # Agent frames from a visitor: one nack each, naming the refused request and its cid.
        await ws.send_json({"type": "claim", "conversation_id": "x", "cid": "k1"})
        nack = await recv(ws)
        assert (nack["request_type"], nack["code"], nack["cid"]) == ("claim", "forbidden", "k1")
        await ws.close()


@pytest.mark.parametrize("case", ["bad header", "bad hello token", "no token", "first frame not hello"])
async def test_ws_auth_failure_closes_4001(kb_stack: Stack, case: str) -> None:
    headers = {"Authorization": "Bearer not-a-jwt"} if case == "bad header" else None
    first: dict[str, Any] = {"type": "hello"}
    if case == "bad hello token":
        first["token"] = token(sub="x")[:-4] + "AAAA"
    elif case == "first frame not hello":
        first = {"type": "ping"}
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, headers)
        if case != "bad header":
            await ws.send_json(first)
        code, frames = await close_code(ws)
    assert code == 4001
    assert [f["code"] for f in frames] == ["unauthorized"]


async def test_ws_query_string_token_is_not_accepted(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{kb_stack.base_url}/v1/ws?token={token(sub='q')}")
        await ws.send_json({"type": "hello"})
        code, _ = await close_code(ws)
    assert code == 4001


async def test_ws_same_cid_twice_is_stored_once_and_answered_once(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, auth(sub="ws-dup"))
        await hello(ws)
        echo, ack, *rest = await send_and_answer(ws, "same", "运费怎么算？")
        conversation_id = echo["conversation_id"]
        await ws.close()
        # A retry after a drop, on a new socket that resumed the conversation now known.
        ws = await open_ws(http, kb_stack, auth(sub="ws-dup"))
        await hello(ws, resume=[{"conversation_id": conversation_id, "after_seq": rest[-1]["seq"]}])
        await ws.send_json({"type": "send", "cid": "same", "conversation_id": conversation_id, "text": "运费怎么算？"})
        assert await recv(ws) == {"type": "ack", "cid": "same", "seq": ack["seq"], "duplicate": True}
        # Frames are handled in order: a second answer would come before this pong.
        await ws.send_json({"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        async with http.get(f"{kb_stack.base_url}/v1/sessions/{conversation_id}/messages",
                            headers=auth(sub="ws-dup")) as response:
            assert [m["role"] for m in (await response.json())["messages"]] == ["user", "assistant"]
        await ws.close()


async def test_ws_resume_replays_exactly_the_missed_events_in_order(kb_stack: Stack) -> None:
    visitor = auth(sub="ws-resume")
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, visitor)
        await hello(ws)
        first = await send_and_answer(ws, "r-1")
        conversation_id, last_seen = first[0]["conversation_id"], first[-1]["seq"]
        await ws.close()
        # While the socket is away, the conversation goes on over POST /v1/chat.
        async with http.post(f"{kb_stack.base_url}/v1/chat", headers=visitor, json={
                "message": "怎么退货？", "session_id": conversation_id, "stream": False}) as response:
            assert response.status == 200
            missed_reply = (await response.json())["reply"]

        ws = await open_ws(http, kb_stack, visitor)
        welcome = await hello(ws, resume=[{"conversation_id": conversation_id, "after_seq": last_seen}])
        assert welcome["conversation_id"] == conversation_id
        assert welcome["resume"] == [{"conversation_id": conversation_id, "result": "ok"}]
        missed = [await recv(ws), await recv(ws)]
        assert [(f["type"], f["sender"]["type"], f["text"]) for f in missed] == [
            ("msg", "visitor", "怎么退货？"), ("msg", "ai", missed_reply)]
        assert last_seen < missed[0]["seq"] < missed[1]["seq"]
        await ws.send_json({"type": "ping"})
        assert await recv(ws) == {"type": "pong"}  # nothing else, nothing twice

        # A second tab resumes from the start while the first keeps the shared feed open.
        tab = await open_ws(http, kb_stack, visitor)
        await hello(tab, resume=[{"conversation_id": conversation_id, "after_seq": 0}])
        replay = [await recv(tab) for _ in range(4)]
        assert [f["seq"] for f in replay] == sorted({f["seq"] for f in replay})
        assert replay[-2:] == missed and replay[:2] == [{k: v for k, v in f.items() if k != "cid"}
                                                        for f in (first[0], first[-1])]
        # Live: a send on one tab reaches both, the other tab included.
        live = await send_and_answer(ws, "r-2", "运费怎么算？", conversation_id=conversation_id)
        other = await recv_until_ai_msg(tab)
        assert [f["seq"] for f in other if f["type"] == "msg"] == [f["seq"] for f in live if f["type"] == "msg"]
        assert "cid" not in other[0] and live[0]["cid"] == "r-2"
        await ws.close()
        await tab.close()


@pytest.mark.parametrize("how", ["resume", "send"])
async def test_ws_another_visitors_conversation_closes_4003(kb_stack: Stack, how: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{kb_stack.base_url}/v1/chat", headers=auth(sub="ws-owner"),
                             json={"message": QUESTION, "stream": False}) as response:
            conversation_id = (await response.json())["session_id"]
        ws = await open_ws(http, kb_stack, auth(sub="ws-intruder"))
        if how == "resume":
            await ws.send_json({"type": "hello", "resume": [{"conversation_id": conversation_id, "after_seq": 0}]})
        else:
            await hello(ws)
            await ws.send_json({"type": "send", "cid": "x", "conversation_id": conversation_id, "text": "hi"})
        code, frames = await close_code(ws)
    assert code == 4003
    assert [f["type"] for f in frames] == ["error"] and frames[0]["code"] == "forbidden"


async def test_ws_blocked_input_gets_a_nack(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, auth(sub="ws-blocked"))
        await hello(ws)
        await ws.send_json({"type": "send", "cid": "b-1", "text": "来刷单返利吧"})
        nack = await recv(ws)
        assert (nack["type"], nack["request_type"], nack["cid"], nack["code"]) == (
            "nack", "send", "b-1", "content_blocked")
        await ws.close()


async def test_ws_third_bad_frame_closes_4400(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, auth(sub="ws-bad"))
        await hello(ws)
        await ws.send_str("{not json")
        await ws.send_json({"type": "dance"})
        await ws.send_json({"type": "send", "cid": "x"})
        code, frames = await close_code(ws)
    assert code == 4400
    assert [(f["type"], f["code"]) for f in frames] == [
        ("error", "invalid_json"), ("error", "unknown_type"), ("error", "invalid_frame")]


async def test_ws_frame_over_64_kib_closes_1009(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, auth(sub="ws-big"))
        await hello(ws)
        await ws.send_str(json.dumps({"type": "send", "cid": "big", "text": "x" * 65536}))
        code, _ = await close_code(ws)
    assert code == 1009


async def test_ws_answer_is_stored_when_the_socket_drops_mid_turn(kb_stack: Stack) -> None:
    visitor = auth(sub="ws-drop")
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, visitor)
        await hello(ws)
        first = await send_and_answer(ws, "d-1")
        conversation_id, last_seen = first[0]["conversation_id"], first[-1]["seq"]
        await ws.send_json({"type": "send", "cid": "d-2", "text": "怎么退货？"})
        await ws.close()  # gone before the answer
        ws = await open_ws(http, kb_stack, visitor)
        await hello(ws, resume=[{"conversation_id": conversation_id, "after_seq": last_seen}])
        # ai_delta frames may come in between if the answer is still streaming.
        frames = [f for f in await recv_until_ai_msg(ws) if f["type"] == "msg"]
        assert [f["sender"]["type"] for f in frames] == ["visitor", "ai"]
        assert frames[0]["text"] == "怎么退货？" and frames[1]["text"]
        await ws.close()


async def test_ws_first_send_retried_without_its_conversation_is_not_stored_again(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await open_ws(http, kb_stack, auth(sub="ws-lost-id"))
        await hello(ws)
        first = await send_and_answer(ws, "first")
        conversation_id, seq = first[0]["conversation_id"], first[0]["seq"]
        await ws.close()
        # A new socket that never learnt the conversation id: hello continues the visitor's open
        # conversation (its history replayed), and the same cid resent is not stored again.
        ws = await open_ws(http, kb_stack, auth(sub="ws-lost-id"))
        welcome = await hello(ws)
        assert welcome["conversation_id"] == conversation_id and welcome["status"] == "ai"
        assert [(f["type"], f["seq"]) for f in [await recv(ws), await recv(ws)]] == [
            ("msg", seq), ("msg", first[-1]["seq"])]
        await ws.send_json({"type": "send", "cid": "first", "text": QUESTION})
        assert await recv(ws) == {"type": "ack", "cid": "first", "seq": seq, "duplicate": True}
        await ws.send_json({"type": "ping"})
        assert await recv(ws) == {"type": "pong"}  # and no second answer before it
        await ws.close()
        async with http.get(f"{kb_stack.base_url}/v1/sessions/{conversation_id}/messages",
                            headers=auth(sub="ws-lost-id")) as response:
            assert [m["role"] for m in (await response.json())["messages"]] == ["user", "assistant"]
