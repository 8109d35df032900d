"""POST /v1/chat through the real processes, answered by the offline knowledge base."""

from __future__ import annotations

from typing import Any

import aiohttp

from bench.sse_reader import read_sse
from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth


async def chat_events(stack: Stack, body: dict[str, object],
                      headers: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.base_url}/v1/chat", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            return [(e.event, e.json()) async for e in read_sse(response)]


async def test_chat_streams_session_messages_then_done(kb_stack: Stack) -> None:
    events = await chat_events(kb_stack, {"message": "下单后多久发货？"}, auth())
    names = [name for name, _ in events]
    assert names[0] == "session" and names[-1] == "done"
    assert set(names[1:-1]) == {"message"} and len(names) > 3
    reply = "".join(data["delta"] for name, data in events if name == "message")
    assert "发货" in reply
    done = events[-1][1]
    assert done["message_id"] == events[0][1]["message_id"]
    assert done["model"] == "knowledge-base" and done["cached"] is False
    assert done["usage"]["completion_tokens"] > 0 and done["finish_reason"] == "stop"


async def test_chat_conversation_is_stored_and_listed_for_its_owner(kb_stack: Stack) -> None:
    events = await chat_events(kb_stack, {"message": "How long does shipping take?"}, auth(sub="owner-a"))
    session_id = events[0][1]["session_id"]
    reply = "".join(data["delta"] for name, data in events if name == "message")
    await chat_events(kb_stack, {"message": "Can I return tea?", "session_id": session_id}, auth(sub="owner-a"))
    async with aiohttp.ClientSession() as http:
        url = f"{kb_stack.base_url}/v1/sessions/{session_id}/messages"
        async with http.get(url, headers=auth(sub="owner-a")) as response:
            assert response.status == 200
            listed = await response.json()
        assert [m["role"] for m in listed["messages"]] == ["user", "assistant", "user", "assistant"]
        assert listed["messages"][0]["content"] == "How long does shipping take?"
        assert listed["messages"][1]["content"] == reply
        async with http.get(url, headers=auth(sub="owner-b")) as response:
            assert response.status == 404  # another visitor: exactly like an id that never existed
        async with http.get(url, headers=auth(sub="agent-1", role="agent")) as response:
            assert response.status == 200
        async with http.get(url, headers=auth(tenant="shop2", sub="agent-1", role="agent")) as response:
            assert response.status == 404


async def test_chat_unknown_session_is_404_before_any_stream(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{kb_stack.base_url}/v1/chat", headers=auth(),
                             json={"message": "hi", "session_id": "0" * 32}) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"


async def test_chat_non_stream_returns_one_json_object(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{kb_stack.base_url}/v1/chat", headers=auth(),
                             json={"message": "怎么退货", "stream": False}) as response:
            assert response.status == 200
            body = await response.json()
    assert body["reply"] and body["session_id"] and body["message_id"]
    assert body["finish_reason"] == "stop" and body["model"] == "knowledge-base"


async def test_chat_blocked_input_is_400_and_masked_input_is_stored_masked(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{kb_stack.base_url}/v1/chat", headers=auth(),
                             json={"message": "来刷单返利吧", "stream": False}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "content_blocked"
        async with http.post(f"{kb_stack.base_url}/v1/chat", headers=auth(sub="masked"),
                             json={"message": "你这个傻逼", "stream": False}) as response:
            session_id = (await response.json())["session_id"]
        async with http.get(f"{kb_stack.base_url}/v1/sessions/{session_id}/messages",
                            headers=auth(sub="masked")) as response:
            assert (await response.json())["messages"][0]["content"] == "你这个**"


async def test_delete_session_erases_it(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{kb_stack.base_url}/v1/chat", headers=auth(sub="eraser"),
                             json={"message": "hello", "stream": False}) as response:
            session_id = (await response.json())["session_id"]
        url = f"{kb_stack.base_url}/v1/sessions/{session_id}"
        async with http.delete(url, headers=auth(sub="someone-else")) as response:
            assert response.status == 404
        async with http.delete(url, headers=auth(sub="eraser")) as response:
            assert response.status == 204
        async with http.get(f"{url}/messages", headers=auth(sub="eraser")) as response:
            assert response.status == 404


async def test_models_lists_the_routes_and_generation(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{kb_stack.base_url}/v1/models", headers=auth()) as response:
            assert response.status == 200
            body = await response.json()
    assert body["object"] == "list" and body["generation"] == 1
    default = next(m for m in body["data"] if m["id"] == "default")
    assert default["object"] == "model" and default["targets"][0]["provider"] == "knowledge_base"
