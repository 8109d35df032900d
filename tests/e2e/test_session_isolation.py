"""No existence oracle: every endpoint and RPC answers for another's session exactly as for one that never existed."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from devtools.devstack.stack import Stack
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel
from tests.e2e.stack_helpers import auth

OWNER = ("shop1", "owner-a", "visitor")
STRANGERS = [
    ("shop1", "visitor-b", "visitor"),   # same tenant, another visitor
    ("shop2", "owner-a", "visitor"),     # another tenant, even with the same subject
    ("shop2", "agent-9", "agent"),       # staff of another tenant
    ("shop2", "admin-9", "admin"),
]
STAFF = [("shop1", "agent-1", "agent"), ("shop1", "admin-1", "admin")]
MALFORMED_IDS = ["abc", "0" * 31, "0" * 33, "A" * 32, "g" * 32, "%E4%BC%9A%E8%AF%9D", "x" * 200, "0" * 31 + "%0A"]


@dataclass(frozen=True)
class Answer:
    """What a client can observe of a refused request, minus the per-request id."""

    status: int
    content_type: str
    body: Any


async def call(http: aiohttp.ClientSession, stack: Stack, method: str, path: str, who: tuple[str, str, str],
               body: dict[str, Any] | None = None) -> Answer:
    async with http.request(method, f"{stack.base_url}{path}", headers=auth(*who), json=body) as response:
        payload = await response.json() if response.content_type == "application/json" else await response.text()
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            assert payload["error"].pop("request_id") == response.headers["X-Request-Id"]
        return Answer(response.status, response.content_type, payload)


async def every_endpoint(http: aiohttp.ClientSession, stack: Stack, session_id: str,
                         who: tuple[str, str, str]) -> dict[str, Answer]:
    return {
        "chat stream": await call(http, stack, "POST", "/v1/chat", who,
                                  {"message": "我的订单到哪了？", "session_id": session_id}),
        "chat json": await call(http, stack, "POST", "/v1/chat", who,
                                {"message": "我的订单到哪了？", "session_id": session_id, "stream": False}),
        "list": await call(http, stack, "GET", f"/v1/sessions/{session_id}/messages", who),
        "delete": await call(http, stack, "DELETE", f"/v1/sessions/{session_id}", who),
    }


def never_existed() -> str:
    return secrets.token_hex(16)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def owners_session(http: aiohttp.ClientSession, stack: Stack) -> tuple[str, list[dict[str, Any]]]:
    answer = await call(http, stack, "POST", "/v1/chat", OWNER, {"message": "怎么退货？", "stream": False})
    assert answer.status == 200, answer
    session_id = answer.body["session_id"]
    listed = await call(http, stack, "GET", f"/v1/sessions/{session_id}/messages", OWNER)
    assert listed.status == 200 and len(listed.body["messages"]) == 2
    return session_id, listed.body["messages"]


async def test_isolation_strangers_get_exactly_the_never_existed_answer(kb_stack: Stack,
                                                                         http: aiohttp.ClientSession) -> None:
    session_id, before = await owners_session(http, kb_stack)
    for who in STRANGERS:
        baseline = await every_endpoint(http, kb_stack, never_existed(), who)
        assert {a.status for a in baseline.values()} == {404}
        assert all(a.body["error"]["code"] == "not_found" for a in baseline.values())
        assert await every_endpoint(http, kb_stack, session_id, who) == baseline, who
    after = await call(http, kb_stack, "GET", f"/v1/sessions/{session_id}/messages", OWNER)
    assert after.body["messages"] == before  # nothing appended, nothing erased


async def test_isolation_staff_of_the_tenant_read_but_neither_write_nor_delete(kb_stack: Stack,
                                                                                http: aiohttp.ClientSession) -> None:
    session_id, before = await owners_session(http, kb_stack)
    for who in STAFF:
        listed = await call(http, kb_stack, "GET", f"/v1/sessions/{session_id}/messages", who)
        assert listed.status == 200 and listed.body == {"session_id": session_id, "messages": before}
        baseline = await every_endpoint(http, kb_stack, never_existed(), who)
        answers = await every_endpoint(http, kb_stack, session_id, who)
        # Chatting would put words in the visitor's mouth; erasing is the owner's right.
        for name in ("chat stream", "chat json", "delete"):
            assert answers[name] == baseline[name], (who, name)
    after = await call(http, kb_stack, "GET", f"/v1/sessions/{session_id}/messages", OWNER)
    assert after.body["messages"] == before


async def test_isolation_deleted_session_answers_like_one_that_never_existed(kb_stack: Stack,
                                                                              http: aiohttp.ClientSession) -> None:
    session_id, _ = await owners_session(http, kb_stack)
    deleted = await call(http, kb_stack, "DELETE", f"/v1/sessions/{session_id}", OWNER)
    assert deleted.status == 204
    for who in (OWNER, *STAFF, *STRANGERS):
        assert await every_endpoint(http, kb_stack, session_id, who) == \
            await every_endpoint(http, kb_stack, never_existed(), who), who


async def test_isolation_malformed_ids_answer_like_one_that_never_existed(kb_stack: Stack,
                                                                           http: aiohttp.ClientSession) -> None:
    baseline = await every_endpoint(http, kb_stack, never_existed(), OWNER)
    for bad in MALFORMED_IDS:
        for name, method, path in (("list", "GET", f"/v1/sessions/{bad}/messages"),
                                   ("delete", "DELETE", f"/v1/sessions/{bad}")):
            assert await call(http, kb_stack, method, path, OWNER) == baseline[name], (bad, name)


async def test_isolation_chat_with_a_malformed_id_answers_like_one_that_never_existed(
        kb_stack: Stack, http: aiohttp.ClientSession) -> None:
    baseline = await every_endpoint(http, kb_stack, never_existed(), OWNER)
    answer = await call(http, kb_stack, "POST", "/v1/chat", OWNER,
                        {"message": "hi", "session_id": "A" * 32, "stream": False})
    assert answer == baseline["chat json"]


def principal(who: tuple[str, str, str]) -> session_pb2.Principal:
    tenant, subject, role = who
    return session_pb2.Principal(tenant=tenant, subject=subject, role=role)


async def rpc_outcomes(stub: session_pb2_grpc.SessionServiceStub, session_id: str,
                       who: tuple[str, str, str]) -> dict[str, tuple[grpc.StatusCode, str]]:
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "Append": lambda: stub.Append(session_pb2.AppendRequest(
            principal=principal(who), session_id=session_id, role="user", content="let me in"), timeout=5),
        "Append as agent": lambda: stub.Append(session_pb2.AppendRequest(
            principal=principal(who), session_id=session_id, role="agent", content="let me in"), timeout=5),
        "BuildContext": lambda: stub.BuildContext(session_pb2.BuildContextRequest(
            principal=principal(who), session_id=session_id, max_tokens=500, model="gpt-4o"), timeout=5),
        "ListMessages": lambda: stub.ListMessages(session_pb2.ListMessagesRequest(
            principal=principal(who), session_id=session_id), timeout=5),
        "DeleteSession": lambda: stub.DeleteSession(session_pb2.DeleteSessionRequest(
            principal=principal(who), session_id=session_id), timeout=5),
    }
    outcomes: dict[str, tuple[grpc.StatusCode, str]] = {}
    for name, make_call in calls.items():
        try:
            await make_call()
            outcomes[name] = (grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as error:
            outcomes[name] = (error.code(), error.details() or "")
    return outcomes


async def test_isolation_grpc_rpcs_answer_strangers_like_a_session_that_never_existed(
        kb_stack: Stack, http: aiohttp.ClientSession) -> None:
    session_id, before = await owners_session(http, kb_stack)
    target = f"127.0.0.1:{kb_stack.config.ports.session}"
    async with internal_channel(target, kb_stack.config.internal_token) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        for who in STRANGERS:
            baseline = await rpc_outcomes(stub, never_existed(), who)
            assert {code for code, _ in baseline.values()} == {grpc.StatusCode.NOT_FOUND}
            assert await rpc_outcomes(stub, session_id, who) == baseline, who
        baseline = await rpc_outcomes(stub, never_existed(), OWNER)
        for bad in ("", "abc", "A" * 32, "0" * 33, "会话", "shop1." + session_id, session_id + ".x", ">"):
            outcomes = await rpc_outcomes(stub, bad, OWNER)
            expected = baseline
            if not bad:  # an empty id on Append creates the caller's own session: not a lookup
                outcomes = {k: v for k, v in outcomes.items() if not k.startswith("Append")}
                expected = {k: v for k, v in baseline.items() if not k.startswith("Append")}
            assert outcomes == expected, bad
        staff = await rpc_outcomes(stub, session_id, STAFF[0])
        baseline = await rpc_outcomes(stub, never_existed(), STAFF[0])
        assert staff["ListMessages"][0] is staff["BuildContext"][0] is grpc.StatusCode.OK
        assert staff["Append as agent"][0] is grpc.StatusCode.OK  # an agent answering (handoff)
        assert staff["Append"] == baseline["Append"] and staff["DeleteSession"] == baseline["DeleteSession"]
        listed = await stub.ListMessages(session_pb2.ListMessagesRequest(
            principal=principal(OWNER), session_id=session_id), timeout=5)
    assert [m.content for m in listed.messages] == [m["content"] for m in before] + ["let me in"]
    assert [m.role for m in listed.messages][-1] == "agent"
