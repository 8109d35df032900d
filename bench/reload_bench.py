"""Plugin hot reload: latency from a write to the first request served by the new version,
and the worker's memory across 100 reloads.

    python -m bench.reload_bench [--reloads 100]

Runs a real worker process (`python -m services.llm_worker`) on a temporary plugins folder and
talks to it over gRPC, as the edge does. There is no direct path to compare with: the figure
is the worker's own cost of a reload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.proc_stats import memory_kib
from bench.processes import INTERNAL_TOKEN, start_service, stop_process
from devtools.devstack.nats_server import start_nats_server
from devtools.devstack.stack import REPO_ROOT, free_port
from kefu.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.grpc_client import internal_channel

PLUGIN = '''
from services.llm_worker.plugin_api import Delta, Finish, Usage
VERSION = "{version}"
PAYLOAD = "{payload}"  # some module weight, so a leak would show in RSS


class Versioned:
    name = "versioned"

    def __init__(self, settings, context):
        self.capabilities = frozenset({{"stream"}})

    async def setup(self):
        self.table = [PAYLOAD] * 1000

    async def self_test(self):
        pass

    async def aclose(self):
        self.table = []

    async def stream(self, messages, params):
        yield Delta(VERSION)
        yield Finish("stop", Usage(1, 1), "bench")


plugin = Versioned
'''
ROUTES = '[routes.default]\nprovider = "versioned"\n'


@dataclass(frozen=True)
class ReloadFigures:
    reloads: int
    latency_p50_s: float
    latency_p95_s: float
    latency_max_s: float
    rss_start_kib: int
    rss_after_10_kib: int
    rss_end_kib: int


def write_version(folder: Path, version: int) -> None:
    temp = folder / ".versioned.py.tmp"
    temp.write_text(PLUGIN.format(version=f"v{version}", payload="x" * 1000))
    temp.replace(folder / "versioned.py")


async def serving_version(stub: llm_pb2_grpc.LlmServiceStub) -> str:
    call = stub.Generate(llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content="hi")]),
                         timeout=5)
    text = ""
    async for response in call:
        text += response.delta
    return text


async def first_version(stub: llm_pb2_grpc.LlmServiceStub, timeout_s: float = 30.0) -> str:
    """The first answer, once the worker has the output filter's lexicon (UNAVAILABLE until then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await serving_version(stub)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def run(reloads: int) -> ReloadFigures:
    with tempfile.TemporaryDirectory(prefix="kefu-reload-bench-") as tmp:
        folder = Path(tmp) / "plugins"
        folder.mkdir()
        write_version(folder, 1)
        (folder / "routes.toml").write_text(ROUTES)
        port = free_port()
        # The worker keeps its shared state on NATS, and lets no answer out before the moderation service
        # has published the lexicon of its output filter there.
        server = start_nats_server(Path(tmp) / "nats")
        moderation, _ = start_service("moderation", {"KEFU_NATS_URL": server.url}, Path(tmp) / "moderation.log")
        env = {**os.environ, "KEFU_PLUGINS_DIR": str(folder), "KEFU_WORKER_PORT": str(port),
               "KEFU_NATS_URL": server.url, "KEFU_WORKER_METRICS_PORT": str(free_port()), "KEFU_LOG_LEVEL": "WARNING",
               "KEFU_CACHE_SHARED": "false", "KEFU_INTERNAL_TOKEN": INTERNAL_TOKEN}
        worker = subprocess.Popen([sys.executable, "-m", "services.llm_worker"], cwd=REPO_ROOT, env=env)
        try:
            async with internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                stub = llm_pb2_grpc.LlmServiceStub(channel)
                assert await first_version(stub) == "v1"
                rss_start = memory_kib(worker.pid)["VmRSS"]
                latencies = []
                rss_after_10 = 0
                for version in range(2, reloads + 2):
                    written = time.perf_counter()
                    write_version(folder, version)
                    while await serving_version(stub) != f"v{version}":
                        await asyncio.sleep(0.005)
                    latencies.append(time.perf_counter() - written)
                    if version == 11:
                        rss_after_10 = memory_kib(worker.pid)["VmRSS"]
                rss_end = memory_kib(worker.pid)["VmRSS"]
        finally:
            worker.terminate()
            worker.wait(10)
            stop_process(moderation)
            server.stop()
    ordered = sorted(latencies)
    return ReloadFigures(reloads, statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))], ordered[-1],
                         rss_start, rss_after_10, rss_end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=100)
    args = parser.parse_args()
    figures = asyncio.run(run(args.reloads))
    print(json.dumps(asdict(figures), indent=2))
    print(f"\nreload latency (write -> first request on the new version): p50 {figures.latency_p50_s * 1000:.0f} ms, "
          f"p95 {figures.latency_p95_s * 1000:.0f} ms, max {figures.latency_max_s * 1000:.0f} ms "
          f"over {figures.reloads} reloads")
    print(f"worker RSS: {figures.rss_start_kib / 1024:.1f} MiB at start, {figures.rss_after_10_kib / 1024:.1f} MiB "
          f"after 10, {figures.rss_end_kib / 1024:.1f} MiB after {figures.reloads} reloads")

if __name__ == "__main__":
    main()
