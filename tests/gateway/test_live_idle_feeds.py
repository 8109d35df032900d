"""An idle followed conversation costs the edge its feed's few objects: no task, future or closure of its own
(issue 19: 100,000 live conversations on one machine). Over the real session service and nats-server."""

from __future__ import annotations

import asyncio

from aiohttp import ClientWebSocketResponse

from gateway import keys
from gateway.live.channels import Route
from kefu.session.v1 import session_pb2_grpc
from tests.gateway.live_http_support import EdgeClient, bearer, eventually
from tests.gateway.session_edge import say, who

VISITORS = 12


async def _resumed(edge: EdgeClient, subject: str, conversation_id: str) -> ClientWebSocketResponse:
    ws = await edge.ws_connect("/v1/ws", headers=bearer("visitor", sub=subject))
    await ws.send_json({"type": "hello", "resume": [{"conversation_id": conversation_id, "after_seq": 0}]})
    while (frame := await ws.receive_json(timeout=10))["type"] != "welcome":
        assert frame["type"] == "msg", frame  # the replayed visitor message may come first
    assert frame["resume"] == [{"conversation_id": conversation_id, "result": "ok"}], frame
    return ws


async def test_following_idle_conversations_adds_no_task_future_or_closure(
        client: EdgeClient, stub: session_pb2_grpc.SessionServiceStub) -> None:
    conversations = {f"idle-{n}": await say(stub, who(f"idle-{n}"), f"第 {n} 个问题") for n in range(VISITORS + 1)}
    subjects = list(conversations)
    feeds = client.app[keys.LIVE].hub.feeds
    sockets = [await _resumed(client, subjects[0], conversations[subjects[0]])]

    async def following(count: int) -> bool:
        feeds_now = [feeds.feed("shop1", conversations[s]) for s in subjects[:count]]
        return all(feed is not None and feed.subscription is not None for feed in feeds_now)

    await eventually(lambda: following(1), what="the first feed follows its conversation")
    tasks_with_one = len(asyncio.all_tasks())
    sockets += await asyncio.gather(*(_resumed(client, s, conversations[s]) for s in subjects[1:]))
    await eventually(lambda: following(len(subjects)), what="every feed follows its conversation")
    followed = [feed for s in subjects if (feed := feeds.feed("shop1", conversations[s])) is not None]
    assert len(followed) == len(subjects)
    await asyncio.sleep(0.05)
    # Twelve more followed conversations, each with its socket: not one more task.
    assert len(asyncio.all_tasks()) <= tasks_with_one
    for feed in followed:
        assert feed.task is None and feed.ready is None  # its start-up is over and let go
        assert isinstance(feed.subscription, Route)
        handler = feed.subscription._handler  # the feed's own method, not a closure per conversation
        assert id(getattr(handler, "__self__", None)) == id(feed)
        assert type(feed.buffer) is list and feed.buffer[-1].seq == feed.last_seq > 0  # the question
        assert len(feed.connections) == 1
    for ws in sockets:  # and they still work
        await ws.send_json({"type": "ping"})
        while (await ws.receive_json(timeout=5))["type"] != "pong":
            pass
        await ws.close()

    async def all_gone() -> bool:  # the last socket of each left: its feed went
        return all(feeds.feed("shop1", conversations[s]) is None for s in subjects)

    await eventually(all_gone, what="every feed dropped")
