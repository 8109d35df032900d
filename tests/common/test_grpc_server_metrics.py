"""kefu_grpc_server_handling_seconds: one series per service, method and status code (issue 18 item 6)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from kefu.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from services.common.grpc_client import internal_channel
from services.common.grpc_server import bind, create_grpc_server
from services.moderation.metrics import ModerationMetrics
from services.moderation.reload import LexiconReloader
from services.moderation.server import ModerationServicer, create_server
from services.moderation.settings import ModerationSettings
from tests.moderation.lexicon_helpers import write_files

INTERNAL_TOKEN = "internal-test-token-0123456789abcdef"
HEALTH = "grpc.health.v1.Health"
MODERATION = "kefu.moderation.v1.ModerationService"
MAX_TEXT_CHARS = 100
SLOW = "kefu.test.v1.Slow"


@dataclass
class Moderation:
    channel: grpc.aio.Channel
    metrics: ModerationMetrics

    def calls(self, service: str, method: str, code: str) -> float:
        labels = {"service": service, "method": method, "code": code}
        return self.metrics.registry.get_sample_value("kefu_grpc_server_handling_seconds_count", labels) or 0.0


@pytest.fixture
async def moderation(tmp_path: Path) -> AsyncIterator[Moderation]:
    """The real moderation server: it serves its own `Check` beside grpc.health.v1's `Check`."""
    folder = tmp_path / "lexicon"
    write_files(folder, {"fraud.txt": "刷单返利\n", "whitelist.txt": "苹果派\n"})
    metrics = ModerationMetrics()
    settings = ModerationSettings(grpc_port=0, metrics_port=0, lexicon_dir=folder, max_text_chars=MAX_TEXT_CHARS,
                                  internal_token=INTERNAL_TOKEN)
    servicer = ModerationServicer(settings, LexiconReloader.load(folder, metrics), metrics)
    server, _health, port = await create_server(settings, servicer, metrics)
    await server.start()
    channel = internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN)
    try:
        yield Moderation(channel, metrics)
    finally:
        await channel.close()
        await server.stop(None)


async def test_grpc_metric_tells_two_services_check_methods_apart(moderation: Moderation) -> None:
    health = health_pb2_grpc.HealthStub(moderation.channel)
    stub = moderation_pb2_grpc.ModerationServiceStub(moderation.channel)
    for _ in range(3):
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    await stub.Check(moderation_pb2.CheckRequest(tenant="t1", text="你好"), timeout=5)
    assert moderation.calls(HEALTH, "Check", "OK") == 3
    assert moderation.calls(MODERATION, "Check", "OK") == 1


async def test_grpc_metric_records_the_status_code_a_call_ended_with(moderation: Moderation) -> None:
    health = health_pb2_grpc.HealthStub(moderation.channel)
    stub = moderation_pb2_grpc.ModerationServiceStub(moderation.channel)
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await stub.Check(moderation_pb2.CheckRequest(tenant="t1", text="长" * (MAX_TEXT_CHARS + 1)), timeout=5)
    assert too_long.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert moderation.calls(MODERATION, "Check", "INVALID_ARGUMENT") == 1
    assert moderation.calls(MODERATION, "Check", "OK") == 0
    assert moderation.calls(HEALTH, "Check", "NOT_FOUND") == 1


async def _slow_stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    yield b"first"
    await asyncio.sleep(60)  # what a worker's Generate does while the upstream is slow
    yield b"never"


@pytest.fixture
async def slow_server() -> AsyncIterator[tuple[grpc.aio.Channel, CollectorRegistry]]:
    """kefu's server bootstrap (create_grpc_server) serving a stream that stalls after its first message."""
    registry = CollectorRegistry()
    server = create_grpc_server(registry, "")
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_stream_rpc_method_handler(_slow_stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SLOW, {"Wait": handler}),))
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, registry
    finally:
        await channel.close()
        await server.stop(None)


async def _recorded(registry: CollectorRegistry, code: str) -> float:
    """The count of Wait calls that ended with `code`, once the server has finished the call."""
    labels = {"service": SLOW, "method": "Wait", "code": code}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (count := registry.get_sample_value("kefu_grpc_server_handling_seconds_count", labels)) is None:
        if loop.time() > deadline:
            return 0.0
        await asyncio.sleep(0.01)
    return count


@pytest.mark.parametrize(("timeout_s", "code"), [(30.0, "CANCELLED"), (0.3, "DEADLINE_EXCEEDED")])
async def test_grpc_metric_counts_a_stream_cut_short(slow_server: tuple[grpc.aio.Channel, CollectorRegistry],
                                                     timeout_s: float, code: str) -> None:
    # The client reads the first message, then either cancels at once or lets its deadline pass.
    channel, registry = slow_server
    wait: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{SLOW}/Wait")
    call = wait(b"", timeout=timeout_s)
    try:
        assert await call.read() == b"first"
        if code == "DEADLINE_EXCEEDED":
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await call.read()
            assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        call.cancel()
    assert await _recorded(registry, code) == 1
    assert registry.get_sample_value("kefu_grpc_server_handling_seconds_count",
                                     {"service": SLOW, "method": "Wait", "code": "OK"}) is None
