"""Issue 20 on the real processes: every process runs on uvloop; the worker's stream window holds later
texts, never the first one, and the answer arrives whole."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest

from bench.sse_reader import read_sse
from devtools.devstack.stack import EDGE, SERVICES, Stack, free_port
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from tests.e2e.stack_helpers import auth, start_stack

WINDOW_MS = 60_000
"""Longer than any test here may run: a text held for the window can only arrive at the answer's end."""


@pytest.fixture(scope="module")
def upstream_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def window_stack(tmp_path_factory: pytest.TempPathFactory, upstream_port: int) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("window-stack"), {
        "KEFU_CACHE_ENABLED": "false", "KEFU_STREAM_WINDOW_MS": str(WINDOW_MS),
        "KEFU_OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1", "KEFU_MODEL": "fake-model",
        "KEFU_OPENAI_API_KEY": "sk-test"})
    try:
        yield stack
    finally:
        stack.stop()


def loops_logged(stack: Stack, name: str) -> list[str]:
    assert stack.config.log_dir is not None
    lines = (stack.config.log_dir / f"{name}.log").read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [e["msg"] for e in entries if e["msg"].startswith("event loop: ")]


def test_every_process_runs_on_uvloop(window_stack: Stack) -> None:
    for name in (EDGE, *SERVICES):
        assert loops_logged(window_stack, name) == ["event loop: uvloop"], name


async def test_first_text_leaves_at_once_while_the_upstream_holds_the_rest(window_stack: Stack,
                                                                           upstream_port: int) -> None:
    # The upstream sends one chunk and then nothing: only a first text sent without waiting for the
    # (one minute) window can reach the client.
    config = FakeUpstreamConfig(reply="您好，订单已经发货了", chunk_count=5, hang_after_chunks=1)
    async with FakeUpstream(config, port=upstream_port):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{window_stack.base_url}/v1/chat", json={"message": "发货了吗"},
                                 headers=auth(sub="window-first")) as response:
                assert response.status == 200
                async with asyncio.timeout(30):
                    async for event in read_sse(response):
                        if event.event == "message":
                            assert "您好".startswith(event.json()["delta"]) and event.json()["delta"]
                            break


async def test_window_joins_the_later_texts_and_the_answer_is_whole(window_stack: Stack,
                                                                    upstream_port: int) -> None:
    reply = "您好！您的订单已于今天上午发货，预计两到三天送达，请留意短信通知。"
    config = FakeUpstreamConfig(reply=reply, chunk_count=20, chunk_interval_s=0.01)
    async with FakeUpstream(config, port=upstream_port):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{window_stack.base_url}/v1/chat", json={"message": "发货了吗"},
                                 headers=auth(sub="window-whole")) as response:
                assert response.status == 200
                events = [(e.event, e.json()) async for e in read_sse(response)]
    texts = [data["delta"] for name, data in events if name == "message"]
    assert "".join(texts) == reply and events[-1][0] == "done"
    # 20 upstream chunks: the first at once, the other 19 in the window the end flushed, and what the
    # edge's output filter held back of a message (its tail) at most once more each.
    assert len(texts) <= 4, texts
