"""A chat turn makes one session call before its first token (BeginTurn), counted by the real session process."""

from __future__ import annotations

import urllib.request
from collections import Counter

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth

SESSION_SERVICE = "kefu.session.v1.SessionService"


def session_calls(stack: Stack) -> Counter[str]:
    """Calls the session process handled so far, per method (its gRPC server histogram's counts)."""
    url = f"http://127.0.0.1:{stack.config.ports.session_metrics}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    calls: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "kefu_grpc_server_handling_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels.get("service") == SESSION_SERVICE:
                calls[sample.labels["method"]] += int(sample.value)
    return calls


async def test_turns_call_begin_turn_once_and_never_build_context(kb_stack: Stack) -> None:
    who = auth(sub="round-trips")
    before = session_calls(kb_stack)
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
    calls = session_calls(kb_stack) - before
    # Per turn: BeginTurn (store + context), then Append (the answer); the listing is ListMessages.
    assert calls == Counter({"BeginTurn": 2, "Append": 2, "ListMessages": 1})
    assert [m["role"] for m in listed["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in listed["messages"]][::2] == ["怎么退货？", "运费谁出？"]
