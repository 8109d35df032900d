"""A chat turn makes one session call before its first token (BeginTurn), counted by the real session process;
its session and moderation calls go over the edge's call streams, not one unary RPC each."""

from __future__ import annotations

from collections import Counter

import aiohttp

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, metric_samples

SESSION_SERVICE = "kefu.session.v1.SessionService"
MODERATION_SERVICE = "kefu.moderation.v1.ModerationService"


def counts(url: str, histogram: str, label: str, **only: str) -> Counter[str]:
    """A histogram's counts so far, per value of `label` (samples with the `only` labels)."""
    found: Counter[str] = Counter()
    for labels, value in metric_samples(url, f"{histogram}_count"):
        if all(labels.get(k) == v for k, v in only.items()):
            found[labels[label]] += int(value)
    return found


def session_operations(stack: Stack) -> Counter[str]:
    """Operations the session process ran so far, whatever carried them."""
    return counts(f"http://127.0.0.1:{stack.config.ports.session_metrics}/metrics",
                  "kefu_session_operation_duration_seconds", "operation")


def unary_calls(stack: Stack, port: int, service: str) -> Counter[str]:
    """Unary calls a process handled so far, per method (a stream is counted when it ends)."""
    return counts(f"http://127.0.0.1:{port}/metrics", "kefu_grpc_server_handling_seconds", "method",
                  service=service)


async def test_turns_call_begin_turn_once_and_never_build_context(kb_stack: Stack) -> None:
    who = auth(sub="round-trips")
    ports = kb_stack.config.ports
    before = session_operations(kb_stack)
    unary_before = (unary_calls(kb_stack, ports.session_metrics, SESSION_SERVICE),
                    unary_calls(kb_stack, ports.moderation_metrics, MODERATION_SERVICE))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{kb_stack.base_url}/v1/chat", json={"message": "怎么退货？", "stream": False},
                             headers=who) as response:
            assert response.status == 200, await response.text()
            first = await response.json()
        session_id = first["session_id"]
        async with http.post(f"{kb_stack.base_url}/v1/chat", headers=who,
                             json={"message": "运费谁出？", "session_id": session_id, "stream": False}) as response:
            assert response.status == 200, await response.text()
        async with http.get(f"{kb_stack.base_url}/v1/sessions/{session_id}/messages", headers=who) as response:
            listed = await response.json()
    operations = session_operations(kb_stack) - before
    # Per turn: BeginTurn (store + context), then Append (the answer); the listing is ListMessages.
    assert operations == Counter({"begin_turn": 2, "append": 2, "list": 1})
    # The turns' calls went over the call streams: the only unary call is the listing's.
    assert unary_calls(kb_stack, ports.session_metrics, SESSION_SERVICE) - unary_before[0] == Counter(
        {"ListMessages": 1})
    assert unary_calls(kb_stack, ports.moderation_metrics, MODERATION_SERVICE) - unary_before[1] == Counter()
    assert [m["role"] for m in listed["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in listed["messages"]][::2] == ["怎么退货？", "运费谁出？"]
