"""Output moderation inside the llm worker (issue 20): the lexicon from moderation through NATS KV, swapped
between turns and never within one, fail closed without it, and no cached answer past a new word."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.sse_reader import read_sse
from devtools.devstack.stack import Stack, free_port
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from kefu.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.grpc_client import internal_channel
from services.common.grpc_server import LIVENESS_SERVICE
from services.common.lexicon.wire import LEXICON_BUCKET, LEXICON_KEY
from services.moderation.settings import BUNDLED_LEXICON
from tests.e2e.stack_helpers import auth, metric_samples, start_stack

Event = tuple[str, dict[str, object]]
WORD = "蓝莓松饼"
"""In no bundled lexicon file: the tests add it to a BLOCK category and take it away again."""


@pytest.fixture(scope="module")
def upstream_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def lexicon_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lexicon") / "lexicon"
    shutil.copytree(BUNDLED_LEXICON, folder, ignore=shutil.ignore_patterns("kustomization.yaml"))
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream_port: int, lexicon_dir: Path) -> Iterator[Stack]:
    """The default route against a fake upstream, the answer cache on, moderation reading `lexicon_dir`."""
    stack = start_stack(tmp_path_factory.mktemp("filter-stack"), {
        "KEFU_OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1", "KEFU_MODEL": "fake-model",
        "KEFU_OPENAI_API_KEY": "sk-test", "KEFU_PREGEN_ENABLED": "false", "KEFU_LEXICON_DIR": str(lexicon_dir),
        "KEFU_LEXICON_QUIET_MS": "50", "KEFU_LEXICON_DEBOUNCE_MS": "200"})
    try:
        yield stack
    finally:
        stack.stop()


def worker_revision(stack: Stack) -> int:
    found = metric_samples(f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics",
                           "kefu_worker_lexicon_revision")
    return int(found[0][1])


async def wait_revision(stack: Stack, changed_from: int, timeout_s: float = 15.0) -> int:
    """The worker's lexicon revision once it is no longer `changed_from`."""
    deadline = time.monotonic() + timeout_s
    while (revision := await asyncio.to_thread(worker_revision, stack)) == changed_from:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker kept lexicon revision {changed_from}")
        await asyncio.sleep(0.05)
    return revision


async def set_blocked(stack: Stack, folder: Path, name: str, words: list[str] | None) -> int:
    """Add (or with None remove) a BLOCK category file; the worker's revision once it has the result."""
    before = await asyncio.to_thread(worker_revision, stack)
    path = folder / f"{name}.txt"
    if words is None:
        path.unlink()
    else:
        temporary = folder / f".{name}.tmp"
        temporary.write_text("# action: block\n" + "\n".join(words) + "\n", encoding="utf-8")
        temporary.replace(path)
    return await wait_revision(stack, before)


async def chat(stack: Stack, message: str, tenant: str = "shop1", into: list[Event] | None = None) -> list[Event]:
    events = into if into is not None else []
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.base_url}/v1/chat", json={"message": message},
                             headers=auth(tenant=tenant)) as response:
            assert response.status == 200, await response.text()
            async for event in read_sse(response):
                events.append((event.event, event.json()))
    return events


def text_of(events: list[Event]) -> str:
    return "".join(str(data["delta"]) for name, data in events if name == "message")


async def wait_text(events: list[Event], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not text_of(events):
        if time.monotonic() > deadline:
            raise TimeoutError("no text streamed")
        await asyncio.sleep(0.01)


SLOW_REPLY = FakeUpstreamConfig(reply="好" * 60 + WORD + "。", chunk_count=65, chunk_interval_s=0.05)
"""About 3 s of answer with WORD at its end: long enough to change the lexicon before the word comes."""


async def test_a_lexicon_change_applies_from_the_next_turn_never_within_one(
        stack: Stack, upstream_port: int, lexicon_dir: Path) -> None:
    async with FakeUpstream(SLOW_REPLY, port=upstream_port):
        # Blocked while a turn that started without the word streams: that turn keeps its lexicon to the end.
        before: list[Event] = []
        turn = asyncio.create_task(chat(stack, "讲个故事", into=before))
        await wait_text(before)
        await set_blocked(stack, lexicon_dir, "e2e_pastry", [WORD])
        assert WORD[0] not in text_of(before)  # the change landed before the word came
        await turn
        assert before[-1][0] == "done" and text_of(before).endswith(WORD + "。")
        after = await chat(stack, "再讲一个")
        assert after[-1] == ("error", {"code": "content_blocked",
                                       "message": "the answer contained blocked content and was stopped"})
        assert WORD[0] not in text_of(after) and text_of(after).startswith("好")

        # And the other way: allowed again while a turn that started with the word blocked streams.
        blocked: list[Event] = []
        turn = asyncio.create_task(chat(stack, "第三个", into=blocked))
        await wait_text(blocked)
        await set_blocked(stack, lexicon_dir, "e2e_pastry", None)
        await turn
        assert blocked[-1][0] == "error" and blocked[-1][1]["code"] == "content_blocked"
        assert WORD[0] not in text_of(blocked)
        allowed = await chat(stack, "第四个")
        assert allowed[-1][0] == "done" and text_of(allowed).endswith(WORD + "。")


async def test_blocked_words_never_leave_the_worker(stack: Stack, upstream_port: int) -> None:
    # The bundled lexicon blocks 刷单返利; the answer reaches it after a harmless start.
    config = FakeUpstreamConfig(reply="欢迎加入我们的刷单返利群，日赚千元", chunk_count=16, chunk_interval_s=0.02)
    async with FakeUpstream(config, port=upstream_port) as upstream:
        async with internal_channel(f"127.0.0.1:{stack.config.ports.worker}", stack.config.internal_token) as channel:
            call = llm_pb2_grpc.LlmServiceStub(channel).Generate(llm_pb2.GenerateRequest(
                tenant="shop1", messages=[llm_pb2.ChatMessage(role="user", content="hello")]), timeout=15)
            responses = [response async for response in call]
        assert upstream.received  # the model did answer: the worker stopped it
    deltas = "".join(r.delta for r in responses)
    assert deltas.startswith("欢迎") and "刷" not in deltas
    done = responses[-1].done
    assert responses[-1].HasField("done") and done.blocked and done.finish_reason == "content_filter"
    # The edge's turn no longer asks moderation about the answer: no CheckStream call at all.
    async with FakeUpstream(FakeUpstreamConfig(reply="您好"), port=upstream_port):
        assert (await chat(stack, "你好"))[-1][0] == "done"
    metrics = f"http://127.0.0.1:{stack.config.ports.moderation_metrics}/metrics"
    checks = metric_samples(metrics, "kefu_moderation_check_duration_seconds_count")
    assert [value for labels, value in checks if labels["kind"] == "unary"][0] >= 1  # the turn's input check
    calls = metric_samples(metrics, "kefu_grpc_server_handling_seconds_count")
    assert not [labels for labels, _ in calls if labels["method"] == "CheckStream"]


async def test_a_cached_answer_does_not_pass_a_new_word(stack: Stack, upstream_port: int, lexicon_dir: Path) -> None:
    tenant = "cache-filter"
    async with FakeUpstream(FakeUpstreamConfig(reply=f"今天有{WORD}和红茶"), port=upstream_port) as upstream:
        first = await chat(stack, "今天有什么点心？", tenant=tenant)
        second = await chat(stack, "今天有什么点心？", tenant=tenant)
        assert (first[-1][1]["cached"], second[-1][1]["cached"]) == (False, True)
        assert text_of(second) == f"今天有{WORD}和红茶"
        asked = len(upstream.received)
        await set_blocked(stack, lexicon_dir, "e2e_cached", [WORD])
        try:
            third = await chat(stack, "今天有什么点心？", tenant=tenant)
        finally:
            await set_blocked(stack, lexicon_dir, "e2e_cached", None)
        assert len(upstream.received) == asked  # served from the cache, and still filtered
    assert third[-1][0] == "error" and third[-1][1]["code"] == "content_blocked"
    assert WORD[0] not in text_of(third)


def worker_health(stack: Stack, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{stack.config.ports.worker}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def test_a_worker_without_a_lexicon_fails_closed_and_is_not_ready(
        stack: Stack, upstream_port: int, lexicon_dir: Path) -> None:
    nc = await nats.connect(stack.nats_url)
    try:
        kv = await nc.jetstream().key_value(LEXICON_BUCKET)
        before = await asyncio.to_thread(worker_revision, stack)
        await kv.delete(LEXICON_KEY)
        assert await wait_revision(stack, before) == 0
    finally:
        await nc.close()
    assert await asyncio.to_thread(worker_health, stack) == health_pb2.HealthCheckResponse.NOT_SERVING
    # Not ready, but alive: Kubernetes' liveness probe must not restart a worker that waits for its lexicon.
    assert await asyncio.to_thread(worker_health, stack, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    async with FakeUpstream(FakeUpstreamConfig(reply="这段话没有人检查过"), port=upstream_port) as upstream:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.base_url}/v1/chat", json={"message": "你好", "stream": False},
                                 headers=auth()) as response:
                assert response.status == 503
                assert (await response.json())["error"]["code"] == "moderation_unavailable"
        streamed = await chat(stack, "你好")
        assert streamed[-1][0] == "error" and streamed[-1][1]["code"] == "moderation_unavailable"
        assert not text_of(streamed) and not upstream.received  # the model was not even asked
        # A lexicon published again (here: after a reload) serves the next turn.
        try:
            assert await set_blocked(stack, lexicon_dir, "e2e_republish", [WORD]) > 0
        finally:
            await set_blocked(stack, lexicon_dir, "e2e_republish", None)
        assert await asyncio.to_thread(worker_health, stack) == health_pb2.HealthCheckResponse.SERVING
        served = await chat(stack, "还有人在吗")  # a question no earlier test cached
    assert served[-1][0] == "done" and text_of(served) == "这段话没有人检查过"
