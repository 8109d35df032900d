"""Canonical keys and warming: paraphrases of a common question share its answer, safely."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.llm_worker.answering import Answerer, WarmedContexts
from services.llm_worker.cache import AnswerCache, LocalTier
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_api import ChatMessage
from services.llm_worker.plugin_host import PluginHost
from services.llm_worker.pregen import Pregenerator, PrioritySlots
from tests.llm_worker.plugin_fixtures import replace_file
from tests.llm_worker.test_cache import ask

# Answers echo the question, so a test sees which wording an answer was generated for. "Shipping?"
# and "Returns?" are common questions; "how fast do you ship" is a confident paraphrase of the first.
ECHO_PLUGIN = '''
import asyncio
from services.llm_worker.plugin_api import Delta, Finish, ProviderError, Usage

CANONICAL = {"shipping?": "Shipping?", "how fast do you ship": "Shipping?", "returns?": "Returns?",
             "can i send it back": "Returns?"}
COMMON = ["Shipping?", "Returns?", "Payment?"]


class Echo:
    name = "echo"

    def __init__(self, settings, context):
        self.capabilities = frozenset({"stream"})
        self.settings = dict(settings)
        self.asked = []
        self.cancelled = []

    async def setup(self):
        pass

    async def self_test(self):
        pass

    async def aclose(self):
        pass

    def canonical_question(self, question):
        return None if "order" in question else CANONICAL.get(question.lower())

    def common_questions(self, like, limit=100):
        return COMMON[:limit]

    def is_standalone(self, question):
        return "order" not in question

    def suggest_next(self, question, limit=3):
        return []

    async def stream(self, messages, params):
        question = messages[-1].content
        self.asked.append(question)
        try:
            await asyncio.sleep(float(self.settings.get("delay_s", 0)))
            if question == "Broken?":
                raise ProviderError("upstream said 503", retryable=True, status=503)
            yield Delta(self.settings.get("model", "m") + " answers ")
            await asyncio.sleep(float(self.settings.get("delay_s", 0)))
            yield Delta(question)
            yield Finish("stop", Usage(1, 3), self.settings.get("model", "m"))
        except asyncio.CancelledError:
            self.cancelled.append(question)
            raise


plugin = Echo
'''
ROUTES = '''
[routes.default]
provider = "echo"
settings = {{ model = "{model}", delay_s = {delay_s} }}
'''


def write_echo(folder: Path, model: str = "model-a", delay_s: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    replace_file(folder / "echo.py", ECHO_PLUGIN)
    replace_file(folder / "routes.toml", ROUTES.format(model=model, delay_s=delay_s))


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[PluginHost]:
    write_echo(tmp_path / "plugins")
    plugin_host = PluginHost(tmp_path / "plugins", "routes.toml", {}, work_dir=tmp_path / "work", settle_s=0.01)
    await plugin_host.start()
    yield plugin_host
    await plugin_host.aclose()


def _recorded(host: PluginHost, name: str) -> list[str]:
    """What the echo plugin's provider recorded (the `asked` or `cancelled` list it keeps)."""
    recorded = getattr(host.current.routes["default"].targets[0].provider, name, None)
    assert isinstance(recorded, list)
    return recorded


def asked(host: PluginHost) -> list[str]:
    return _recorded(host, "asked")


def cancelled(host: PluginHost) -> list[str]:
    return _recorded(host, "cancelled")


@pytest.fixture
async def slow_host(tmp_path: Path) -> AsyncIterator[PluginHost]:
    write_echo(tmp_path / "plugins", delay_s=0.1)
    plugin_host = PluginHost(tmp_path / "plugins", "routes.toml", {}, work_dir=tmp_path / "work", settle_s=0.01)
    await plugin_host.start()
    yield plugin_host
    await plugin_host.aclose()


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_canonical_paraphrase_is_served_the_canonical_questions_answer(host: PluginHost) -> None:
    answerer = Answerer(host, WorkerMetrics(), AnswerCache(LocalTier(1 << 20, 60)))
    assert (await ask(answerer, "t", ChatMessage("user", "Shipping?")))[1].cached is False
    text, done = await ask(answerer, "t", ChatMessage("user", "How fast do you ship"))
    assert (text, done.cached) == ("model-a answers Shipping?", True)
    assert asked(host) == ["Shipping?"]


async def test_canonical_entry_never_holds_a_paraphrases_own_answer(host: PluginHost) -> None:
    answerer = Answerer(host, WorkerMetrics(), AnswerCache(LocalTier(1 << 20, 60)))
    first = await ask(answerer, "t", ChatMessage("user", "How fast do you ship"))
    assert first == ("model-a answers How fast do you ship", first[1]) and not first[1].cached
    # Its own wording is cached; the canonical question is not answered with it.
    assert (await ask(answerer, "t", ChatMessage("user", "how fast do you ship?")))[1].cached
    text, done = await ask(answerer, "t", ChatMessage("user", "Shipping?"))
    assert (text, done.cached) == ("model-a answers Shipping?", False)


async def test_canonical_keys_never_cross_tenants_nor_serve_user_specific_turns(host: PluginHost) -> None:
    answerer = Answerer(host, WorkerMetrics(), AnswerCache(LocalTier(1 << 20, 60)))
    await ask(answerer, "tenant-a", ChatMessage("user", "Shipping?"))
    assert (await ask(answerer, "tenant-b", ChatMessage("user", "how fast do you ship")))[1].cached is False
    personal = (ChatMessage("user", "my order 12 is late"), ChatMessage("assistant", "sorry"),
                ChatMessage("user", "how fast do you ship"))
    assert (await ask(answerer, "tenant-a", *personal))[1].cached is False
    agent = (ChatMessage("user", "Returns?"), ChatMessage("agent", "Li here"), ChatMessage("user", "Shipping?"))
    assert (await ask(answerer, "tenant-a", *agent))[1].cached is False


async def test_warming_pregenerates_the_common_questions_once_per_context(host: PluginHost) -> None:
    metrics = WorkerMetrics()
    cache = AnswerCache(LocalTier(1 << 20, 60))
    pregen = Pregenerator(cache, metrics, live_streams=lambda: 0)
    answerer = Answerer(host, metrics, cache, pregen)
    try:
        await ask(answerer, "t", ChatMessage("user", "Shipping?"))
        await wait_for(lambda: len(cache.local) == 3)
        text, done = await ask(answerer, "t", ChatMessage("user", "can i send it back"))
        assert (text, done.cached) == ("model-a answers Returns?", True)
        assert (await ask(answerer, "t", ChatMessage("user", "Payment?")))[1].cached
        await asyncio.sleep(0.05)
        assert sorted(asked(host)) == ["Payment?", "Returns?", "Shipping?"]  # each generated once
        assert metrics.registry.get_sample_value("kefu_pregenerations_total", {"result": "served"}) == 2
        # Another tenant is warmed on its own, from its own first turn.
        await ask(answerer, "u", ChatMessage("user", "Payment?"))
        await wait_for(lambda: len(cache.local) == 6)
    finally:
        await pregen.aclose()


async def test_warming_after_a_model_swap_never_serves_the_old_models_answers(host: PluginHost,
                                                                             tmp_path: Path) -> None:
    cache = AnswerCache(LocalTier(1 << 20, 60))
    pregen = Pregenerator(cache, WorkerMetrics(), live_streams=lambda: 0)
    answerer = Answerer(host, WorkerMetrics(), cache, pregen)
    try:
        await ask(answerer, "t", ChatMessage("user", "Shipping?"))
        await wait_for(lambda: len(cache.local) == 3)
        write_echo(tmp_path / "plugins", model="model-b")
        assert await host.reload()
        text, done = await ask(answerer, "t", ChatMessage("user", "can i send it back"))
        assert (text, done.cached) == ("model-b answers can i send it back", False)
        await wait_for(lambda: len(cache.local) == 3 + 1 + 3)  # the new version warmed too
        text, done = await ask(answerer, "t", ChatMessage("user", "how fast do you ship"))
        assert (text, done.cached) == ("model-b answers Shipping?", True)
    finally:
        await pregen.aclose()


async def test_warming_waits_behind_likely_next_questions() -> None:
    slots = PrioritySlots(1)
    order: list[str] = []

    async def job(name: str, priority: int) -> None:
        async with slots.slot(priority):
            order.append(name)
            await asyncio.sleep(0.01)

    first = asyncio.create_task(job("running", 0))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(job(f"warm{i}", 1)) for i in range(3)]
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(job("cancelled", 0))
    urgent = asyncio.create_task(job("next", 0))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(first, urgent, *waiting, cancelled, return_exceptions=True)
    assert order == ["running", "next", "warm0", "warm1", "warm2"]


def test_warmed_contexts_warm_again_after_a_while_and_stay_bounded() -> None:
    now = [0.0]
    warmed = WarmedContexts(rewarm_s=60, max_contexts=2, clock=lambda: now[0])
    assert warmed.claim(("a",)) and not warmed.claim(("a",))
    now[0] = 61
    assert warmed.claim(("a",))
    assert warmed.claim(("b",)) and warmed.claim(("c",))
    assert warmed.claim(("a",))  # the oldest was forgotten (bounded): it warms again
    assert not warmed.claim(("c",)) and len(warmed._seen) == 2


async def test_single_flight_turns_asking_meanwhile_join_one_generation(slow_host: PluginHost) -> None:
    answerer = Answerer(slow_host, WorkerMetrics(), AnswerCache(LocalTier(1 << 20, 60)))
    first = asyncio.create_task(ask(answerer, "t", ChatMessage("user", "Shipping?")))
    await asyncio.sleep(0.15)  # the first delta is out
    joined = await asyncio.gather(ask(answerer, "t", ChatMessage("user", "shipping")),
                                  ask(answerer, "t", ChatMessage("user", "how fast do you ship")))
    assert [text for text, _ in [await first, *joined]] == ["model-a answers Shipping?"] * 3
    assert asked(slow_host) == ["Shipping?"]
    other_tenant = await ask(answerer, "u", ChatMessage("user", "Shipping?"))
    assert other_tenant[1].cached is False and asked(slow_host) == ["Shipping?", "Shipping?"]


async def test_single_flight_a_turn_joins_the_pregeneration_of_its_question(slow_host: PluginHost) -> None:
    metrics = WorkerMetrics()
    cache = AnswerCache(LocalTier(1 << 20, 60))
    pregen = Pregenerator(cache, metrics, live_streams=lambda: 0)
    answerer = Answerer(slow_host, metrics, cache, pregen)
    try:
        await ask(answerer, "t", ChatMessage("user", "Payment?"))  # warms Shipping? and Returns? meanwhile
        await wait_for(lambda: "Returns?" in asked(slow_host))
        text, done = await ask(answerer, "t", ChatMessage("user", "can i send it back"))
        assert (text, done.cached) == ("model-a answers Returns?", False)  # joined, not from the cache
        assert sorted(asked(slow_host)) == ["Payment?", "Returns?", "Shipping?"]
    finally:
        await pregen.aclose()


async def test_single_flight_upstream_cancelled_only_when_its_last_reader_hangs_up(slow_host: PluginHost) -> None:
    metrics = WorkerMetrics()
    answerer = Answerer(slow_host, metrics, AnswerCache(LocalTier(1 << 20, 60)))
    alone = asyncio.create_task(ask(answerer, "t", ChatMessage("user", "Returns?")))
    await asyncio.sleep(0.05)
    alone.cancel()
    await wait_for(lambda: cancelled(slow_host) == ["Returns?"])
    leader = asyncio.create_task(ask(answerer, "t", ChatMessage("user", "Shipping?")))
    await asyncio.sleep(0.05)
    follower = asyncio.create_task(ask(answerer, "t", ChatMessage("user", "how fast do you ship")))
    await asyncio.sleep(0.05)
    leader.cancel()
    text, done = await follower
    assert (text, done.finish_reason) == ("model-a answers Shipping?", "stop")
    assert cancelled(slow_host) == ["Returns?"] and asked(slow_host) == ["Returns?", "Shipping?"]
    assert metrics.registry.get_sample_value("kefu_active_streams") == 0
    assert (await ask(answerer, "t", ChatMessage("user", "Shipping?")))[1].cached


async def test_single_flight_every_reader_gets_the_providers_error(slow_host: PluginHost) -> None:
    answerer = Answerer(slow_host, WorkerMetrics(), AnswerCache(LocalTier(1 << 20, 60)))
    results = await asyncio.gather(ask(answerer, "t", ChatMessage("user", "Broken?")),
                                   ask(answerer, "t", ChatMessage("user", "broken")), return_exceptions=True)
    assert [(type(r).__name__, getattr(r, "status", None)) for r in results] == [("ProviderError", 503)] * 2
    assert asked(slow_host) == ["Broken?"]


async def test_single_flight_a_turn_never_joins_a_generation_being_cancelled(slow_host: PluginHost) -> None:
    answerer = Answerer(slow_host, WorkerMetrics(), AnswerCache(LocalTier(1 << 20, 60)))
    leaving = asyncio.create_task(ask(answerer, "t", ChatMessage("user", "Shipping?")))
    await asyncio.sleep(0.05)
    leaving.cancel()
    await asyncio.sleep(0)  # the leader has left; its generation's cancellation is still pending
    text, done = await ask(answerer, "t", ChatMessage("user", "Shipping?"))
    assert (text, done.finish_reason) == ("model-a answers Shipping?", "stop")
    assert asked(slow_host) == ["Shipping?", "Shipping?"]
