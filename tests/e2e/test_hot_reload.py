"""Hot reload under load: 50 streams flow while the plugins folder changes 20 times."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.sse_reader import read_sse
from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, start_stack
from tests.llm_worker.plugin_fixtures import ROUTES_CANARY, ROUTES_ONE, plugin_source
from tests.llm_worker.test_watcher import configmap_swap

STREAMS = 50
CHUNKS = 8
DELAY_S = 0.08


class PluginsFolder:
    """Writes versions either in place (tmp file + rename) or as a ConfigMap `..data` swap."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.files: dict[str, str] = {}
        self._swaps = 0
        path.mkdir()

    def write(self, **files: str) -> None:
        self.files.update(files)
        if self.mode == "configmap":
            self._swaps += 1
            configmap_swap(self.path, dict(self.files), f"2026_11_25_12_00_{self._swaps:02d}.000000001")
            return
        for name, text in files.items():
            temp = self.path / f".{name}.tmp"
            temp.write_text(text)
            temp.replace(self.path / name)


def one_route(model: str = "model-a") -> str:
    return ROUTES_ONE.format(model=model, chunks=CHUNKS, delay_s=DELAY_S)


def plan() -> list[tuple[str, dict[str, str]]]:
    """20 changes: good versions, 3 broken ones (never serving), a canary 90/10, then all on model-b.

    Good steps write both files, so a broken routes file is repaired by the next good step.
    """
    canary = ROUTES_CANARY.format(weight_a=90, weight_b=10, chunks=CHUNKS, delay_s=DELAY_S)
    routes = one_route()
    steps: list[tuple[str, dict[str, str]]] = []
    for n in range(2, 19):
        if n == 15:
            routes = canary
        elif n == 18:
            routes = one_route("model-b")
        steps.append((f"v{n}", {"versioned.py": plugin_source(f"v{n}"), "routes.toml": routes}))
        if n == 5:
            steps.append(("broken-syntax", {"versioned.py": plugin_source("broken1") + "\ndef x(:\n"}))
        elif n == 9:
            failing = plugin_source("broken2", self_test="raise RuntimeError('no')")
            steps.append(("broken-self-test", {"versioned.py": failing}))
        elif n == 12:
            steps.append(("broken-routes", {"routes.toml": "[routes.default\n"}))
    assert len(steps) == 20
    return steps


async def one_stream(http: aiohttp.ClientSession, stack: Stack, user: int) -> tuple[str, list[str]]:
    try:
        async with http.post(f"{stack.base_url}/v1/chat", json={"message": "hello"},
                             headers=auth(sub=f"load-{user}")) as response:
            if response.status != 200:
                return f"http {response.status}", []
            events = [event async for event in read_sse(response)]
    except aiohttp.ClientError as error:
        return f"client error {type(error).__name__}", []
    names = [e.event for e in events]
    if names[-1:] != ["done"]:
        return f"ended with {events[-1].data if events else 'nothing'}", []
    tokens = "".join(e.json()["delta"] for e in events if e.event == "message").split()
    return "ok", tokens


async def current_version(http: aiohttp.ClientSession, stack: Stack) -> str:
    outcome, tokens = await one_stream(http, stack, 9999)
    assert outcome == "ok", outcome
    return tokens[0].split("/")[0]


def refusals(stack: Stack) -> float:
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "kefu_plugin_reloads_total" and sample.labels.get("result") == "refused":
                return sample.value
    return 0.0


@pytest.mark.parametrize("mode", ["plain", "configmap"])
async def test_hot_reload_under_load_fails_no_stream(tmp_path: Path, mode: str) -> None:
    folder = PluginsFolder(tmp_path / "plugins", mode)
    folder.write(**{"versioned.py": plugin_source("v1"), "routes.toml": one_route()})
    stack = await asyncio.to_thread(start_stack, tmp_path / "stack", {
        "KEFU_PLUGINS_DIR": str(folder.path), "KEFU_RATE_LIMIT_RPS": "100000", "KEFU_CACHE_ENABLED": "false",
        "KEFU_TENANT_RATE_LIMIT_RPS": "100000"})
    outcomes: Counter[str] = Counter()
    versions_seen: Counter[str] = Counter()
    mixed: list[list[str]] = []
    stop = asyncio.Event()

    async def user(http: aiohttp.ClientSession, index: int) -> None:
        while not stop.is_set():
            outcome, tokens = await one_stream(http, stack, index)
            outcomes[outcome] += 1
            if outcome == "ok":
                if len(tokens) != CHUNKS or len(set(tokens)) != 1:
                    mixed.append(tokens)
                versions_seen[tokens[0]] += 1

    switch_latencies: list[float] = []
    refused = 0
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            users = [asyncio.create_task(user(http, i)) for i in range(STREAMS)]
            await asyncio.sleep(1)
            for label, files in plan():
                written = time.monotonic()
                folder.write(**files)
                if label.startswith("v"):
                    while await current_version(http, stack) != label:
                        assert time.monotonic() - written < 15, f"{label} never served"
                    switch_latencies.append(time.monotonic() - written)
                else:
                    # Wait for the refusal before the next write replaces the broken version: on a
                    # loaded machine the watcher could otherwise see only the version after it.
                    refused += 1
                    while await asyncio.to_thread(refusals, stack) < refused:
                        assert time.monotonic() - written < 15, f"{label} never refused"
                        await asyncio.sleep(0.1)
                await asyncio.sleep(random.uniform(0.3, 0.8))
            await asyncio.sleep(1)
            stop.set()
            await asyncio.gather(*users)
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics", timeout=5).read().decode()
    finally:
        stop.set()
        await asyncio.to_thread(stack.stop)
    assert sum(outcomes.values()) > 500 and set(outcomes) == {"ok"}, outcomes
    assert mixed == []  # every stream's content came from one generation
    assert not [v for v in versions_seen if v.startswith("broken")]
    assert {v.split("/")[1] for v in versions_seen} == {"model-a", "model-b"}
    assert 'kefu_plugin_reloads_total{result="refused"} 3.0' in metrics
    assert 'kefu_plugin_generation 18.0' in metrics  # v1 and 17 good versions
    # The runbook's signal: generations per upstream model show the canary split, then all on B.
    per_model = Counter[str]()
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "kefu_llm_requests_total" and sample.labels["outcome"] == "ok":
                per_model[sample.labels["model"]] += int(sample.value)
    assert per_model["model-a"] > per_model["model-b"] > 0
    print(f"\n{mode}: {sum(outcomes.values())} streams, version switch after write: "
          f"median {sorted(switch_latencies)[len(switch_latencies) // 2]:.3f} s, max {max(switch_latencies):.3f} s")
