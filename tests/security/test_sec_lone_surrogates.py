"""Issue 17 item 9: a lone surrogate ("\\ud800" in JSON) in any frame or body: an error at once, no hang, no 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, start_stack, token

LONE = "\\ud800"
"""As the raw frame carries it: a JSON escape that decodes to an unpaired surrogate."""
PROMPT_S = 3.0
"""An answer must come this soon (the bug: none ever came)."""
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
CONVERSATION = "0" * 32

# One frame of every client type, each with the surrogate in a string the server reads.
FRAMES = {
    "send-text": '{"type": "send", "cid": "c1", "text": "hi %s"}',
    "send-cid": '{"type": "send", "cid": "c%s", "text": "hi"}',
    "send-conversation": '{"type": "send", "cid": "c1", "conversation_id": "%s", "text": "hi"}',
    "typing": '{"type": "typing", "conversation_id": "%s", "on": true}',
    "read": '{"type": "read", "conversation_id": "%s", "up_to_seq": 1}',
    "handoff": '{"type": "handoff", "conversation_id": "c", "reason": "%s"}',
    "ping-extra": '{"type": "ping", "x": "%s"}',
    "claim": '{"type": "claim", "conversation_id": "%s"}',
    "release": '{"type": "release", "conversation_id": "%s", "to": "ai"}',
    "transfer": '{"type": "transfer", "conversation_id": "c", "agent": "%s"}',
    "close": '{"type": "close", "conversation_id": "c", "cid": "%s"}',
    "note": '{"type": "note", "conversation_id": "c", "cid": "n1", "text": "%s"}',
    "presence": '{"type": "presence", "status": "online", "note": "%s"}',
    "type-itself": '{"type": "send%s"}',
    "key": '{"type": "ping", "%s": 1}',
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("sec-surrogates"))
    try:
        yield started
    finally:
        started.stop()


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any] | int:
    """The next frame, or the close code if the server closed instead."""
    message = await ws.receive(timeout=PROMPT_S)
    if message.type in CLOSED:
        return ws.close_code or 0
    assert message.type is aiohttp.WSMsgType.TEXT, message
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def welcomed(http: aiohttp.ClientSession, stack: Stack, sub: str, role: str = "visitor",
                   ) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{stack.base_url}/v1/ws")
    await ws.send_json({"type": "hello", "token": token(sub=sub, role=role)})
    welcome = await receive(ws)
    assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
    return ws


def assert_refused(answer: dict[str, Any] | int) -> None:
    if isinstance(answer, int):
        assert answer == 4400, answer
    else:
        assert answer["type"] == "error" and answer["code"] == "invalid_frame", answer
        assert "surrogate" in answer["message"]


@pytest.mark.parametrize("field", ["token", "resume-id", "resume-key"])
async def test_sec_hello_with_a_lone_surrogate_gets_an_error_before_welcome(stack: Stack, field: str) -> None:
    good = token(sub="sur-hello")
    frames = {
        "token": f'{{"type": "hello", "token": "{LONE}"}}',
        "resume-id": f'{{"type": "hello", "token": "{good}", "resume": [{{"conversation_id": "{LONE}"}}]}}',
        "resume-key": f'{{"type": "hello", "token": "{good}", "resume": [{{"conversation_id": "{CONVERSATION}", '
                      f'"{LONE}": 0}}]}}',
    }
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{stack.base_url}/v1/ws")
        await ws.send_str(frames[field])
        assert_refused(await receive(ws))
        # The socket is not stuck: a good hello is still answered.
        await ws.send_json({"type": "hello", "token": token(sub="sur-hello-2")})
        welcome = await receive(ws)
        assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
        await ws.close()


@pytest.mark.parametrize("name", sorted(FRAMES))
async def test_sec_every_frame_before_hello_with_a_lone_surrogate_gets_an_error(stack: Stack, name: str) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{stack.base_url}/v1/ws")
        await ws.send_str(FRAMES[name] % LONE)
        assert_refused(await receive(ws))
        await ws.close()


@pytest.mark.parametrize("role", ["visitor", "agent"])
async def test_sec_every_frame_after_welcome_with_a_lone_surrogate_gets_an_error(stack: Stack, role: str) -> None:
    async with aiohttp.ClientSession() as http:
        for name in sorted(FRAMES):
            ws = await welcomed(http, stack, f"sur-{role}-{name}", role)
            await ws.send_str(FRAMES[name] % LONE)
            assert_refused(await receive(ws))
            await ws.send_json({"type": "ping"})  # still served in order
            assert await receive(ws) == {"type": "pong"}, name
            await ws.close()


async def test_sec_the_third_surrogate_frame_closes_with_4400(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await welcomed(http, stack, "sur-strikes")
        for _ in range(3):
            await ws.send_str(FRAMES["send-text"] % LONE)
        answers = [await receive(ws) for _ in range(4)]
        assert answers[-1] == 4400, answers


async def test_sec_a_paired_surrogate_escape_is_text_not_an_error(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await welcomed(http, stack, "sur-emoji")
        await ws.send_str('{"type": "send", "cid": "e1", "text": "\\ud83d\\ude00 \\u4f60\\u597d"}')
        echo = await receive(ws)
        assert isinstance(echo, dict) and echo["type"] == "msg" and echo["text"] == "\U0001f600 你好", echo
        await ws.close()


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat", '{"message": "%s"}'),
    ("/v1/chat", '{"message": "hi", "session_id": "%s"}'),
    ("/v1/chat/completions", '{"model": "default", "messages": [{"role": "user", "content": "%s"}]}'),
    ("/v1/widget/token", '{"tenant": "%s"}'),
])
async def test_sec_json_bodies_with_a_lone_surrogate_are_refused_not_500(stack: Stack, path: str, body: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.base_url}{path}", data=(body % LONE).encode(),
                             headers={**auth(sub="sur-http"), "Content-Type": "application/json"}) as response:
            payload = await response.json()
            # Either a body that is no UTF-8 JSON (400) or one that breaks the schema (422): never a 5xx.
            assert response.status in (400, 422), (response.status, payload)
            assert "error" in payload, payload

