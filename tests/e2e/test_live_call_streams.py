"""The edge's live-chat call streams through the real processes: a human-held conversation keeps working
across a restart of the session service (the edge reopens its stream) and of moderation (issue 20 item 5)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import aiohttp
import pytest

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import faq_plugins_env, start_stack
from tests.e2e.test_ws_handoff import Peer, answers, connect, is_type, start_conversation


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("live-calls-stack")
    stack = start_stack(data_dir, {"KEFU_RATE_LIMIT_RPS": "1000", **faq_plugins_env(data_dir)})
    try:
        yield stack
    finally:
        stack.stop()


def restart(stack: Stack, name: str, port: int) -> None:
    stack.kill(name)  # a crash: the edge's stream breaks with the calls it carried
    stack.start_process(name)
    stack.wait_grpc_serving(name, port, time.monotonic() + 60)


async def exchange(visitor: Peer, agent: Peer, conversation_id: str, tag: str) -> None:
    """A visitor's message reaches the agent; the agent's reply reaches the visitor."""
    await visitor.send(type="send", cid=f"v-{tag}", conversation_id=conversation_id, text=f"问题 {tag}")
    assert (await visitor.next(answers(f"v-{tag}")))["type"] == "ack"
    await agent.next(lambda f: f["type"] == "msg" and f["text"] == f"问题 {tag}")
    await agent.send(type="send", cid=f"a-{tag}", conversation_id=conversation_id, text=f"回答 {tag}")
    assert (await agent.next(answers(f"a-{tag}")))["type"] == "ack"
    await visitor.next(lambda f: f["type"] == "msg" and f["text"] == f"回答 {tag}")


async def test_live_calls_survive_a_restart_of_session_and_moderation(stack: Stack) -> None:
    ports = stack.config.ports
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, stack, sub="restart-visitor")
        agent, _ = await connect(http, stack, sub="restart-agent", role="agent")
        conversation_id = await start_conversation(visitor)
        await agent.send(type="claim", conversation_id=conversation_id, cid="claim")
        await agent.next(is_type("ack", cid="claim"))
        await visitor.next(is_type("state", status="human"))
        await exchange(visitor, agent, conversation_id, "before")
        restart(stack, "session", ports.session)
        await exchange(visitor, agent, conversation_id, "after-session")
        restart(stack, "moderation", ports.moderation)
        await exchange(visitor, agent, conversation_id, "after-moderation")
        # Blocked words are still refused over the reopened moderation stream (fail closed, as before).
        await agent.send(type="send", cid="blocked", conversation_id=conversation_id, text="刷单返利")
        refused = await agent.next(answers("blocked"))
        assert (refused["type"], refused["code"]) == ("nack", "content_blocked"), refused
        await visitor.ws.close()
        await agent.ws.close()
