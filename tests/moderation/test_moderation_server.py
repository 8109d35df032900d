"""The real gRPC server: Check, CheckStream in lockstep, metrics, and reloads under load."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kefu.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from services.common.grpc_client import internal_channel
from services.moderation.metrics import ModerationMetrics
from services.moderation.reload import LexiconReloader, ReloadResult
from services.moderation.server import ModerationServicer, create_server
from services.moderation.settings import ModerationSettings
from tests.moderation.lexicon_helpers import reload_count, wait_until, write_files

INTERNAL_TOKEN = "internal-test-token-0123456789abcdef"
"""The services' bearer credential in these tests (services.common.grpc_client)."""

APPLES = {"fruit.txt": "# action: mask\n苹果\n", "fraud.txt": "刷单返利\n", "whitelist.txt": "苹果派\n"}
BANANAS = {"fruit.txt": "# action: mask\n香蕉\n", "fraud.txt": "刷单返利\n", "whitelist.txt": "苹果派\n"}
TEXT = "我想买苹果和香蕉"
PIECES = ["我想买苹", "果和香", "蕉"]
UNDER_APPLES, UNDER_BANANAS = "我想买**和香蕉", "我想买苹果和**"


@dataclass
class Service:
    stub: moderation_pb2_grpc.ModerationServiceStub
    lexicon: LexiconReloader
    metrics: ModerationMetrics
    folder: Path


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    folder = tmp_path / "lexicon"
    write_files(folder, APPLES)
    metrics = ModerationMetrics()
    lexicon = LexiconReloader.load(folder, metrics)
    settings = ModerationSettings(grpc_port=0, metrics_port=0, lexicon_dir=folder, max_text_chars=1000,
                                  internal_token=INTERNAL_TOKEN)
    server, _health, port = await create_server(settings, ModerationServicer(settings, lexicon, metrics), metrics)
    await server.start()
    channel = internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN)
    try:
        yield Service(moderation_pb2_grpc.ModerationServiceStub(channel), lexicon, metrics, folder)
    finally:
        await channel.close()
        await server.stop(None)


async def stream_in_lockstep(stub: moderation_pb2_grpc.ModerationServiceStub, pieces: list[str],
                             before_piece: dict[int, asyncio.Event] | None = None,
                             ) -> list[moderation_pb2.CheckStreamResponse]:
    """As the edge does: write one request, read its one response; the last request is final."""
    call = stub.CheckStream(timeout=10)
    responses = []
    try:
        for index, piece in enumerate([*pieces, ""]):
            if before_piece and index in before_piece:
                await before_piece[index].wait()
            await call.write(moderation_pb2.CheckStreamRequest(tenant="t1", delta=piece, final=index == len(pieces)))
            response = await call.read()
            assert response is not grpc.aio.EOF, f"no response to request {index}"
            responses.append(response)
            if response.verdict == moderation_pb2.VERDICT_BLOCK:
                break
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    finally:
        call.cancel()
    return responses


def checks(metrics: ModerationMetrics, verdict: str) -> float:
    return metrics.registry.get_sample_value("kefu_moderation_checks_total", {"verdict": verdict}) or 0.0


async def test_server_check_masks_and_counts(service: Service) -> None:
    reply = await service.stub.Check(moderation_pb2.CheckRequest(tenant="t1", text="苹 果派和苹🙂果"), timeout=5)
    assert reply.verdict == moderation_pb2.VERDICT_MASK and reply.masked_text == "苹 果派和***"
    assert [(h.category, h.word, h.start, h.end, h.action) for h in reply.hits] == [("fruit", "苹果", 5, 8, "mask")]
    assert checks(service.metrics, "mask") == 1
    assert service.metrics.registry.get_sample_value(
        "kefu_moderation_hits_total", {"category": "fruit", "action": "mask"}) == 1
    assert service.metrics.registry.get_sample_value(
        "kefu_moderation_check_duration_seconds_count", {"kind": "unary"}) == 1


async def test_server_check_blocks_traditional_text(service: Service) -> None:
    reply = await service.stub.Check(moderation_pb2.CheckRequest(text="來刷單·返利"), timeout=5)
    assert reply.verdict == moderation_pb2.VERDICT_BLOCK and checks(service.metrics, "block") == 1


async def test_server_check_refuses_text_over_the_limit(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await service.stub.Check(moderation_pb2.CheckRequest(text="x" * 1001), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_server_stream_answers_every_request_once_and_catches_a_split_word(service: Service) -> None:
    responses = await stream_in_lockstep(service.stub, ["你好，我想买苹", "果", "派和苹", "果"])
    # 苹果 could still become the whitelisted 苹果派: held until a later delta (or the end) says.
    assert [r.safe_delta for r in responses] == ["你好，我想买", "", "苹果派和", "", "**"]
    assert [r.verdict for r in responses] == [moderation_pb2.VERDICT_ALLOW] * 4 + [moderation_pb2.VERDICT_MASK]
    assert [(h.start, h.end) for h in responses[4].hits] == [(10, 12)]
    assert checks(service.metrics, "mask") == 1


async def test_server_stream_block_answers_once_and_ends(service: Service) -> None:
    # The delta that completes the word gets the BLOCK; nothing after it is read.
    responses = await stream_in_lockstep(service.stub, ["欢迎，", "刷单", "返利", "赚钱"])
    assert [r.safe_delta for r in responses] == ["欢迎，", "", ""]
    assert responses[-1].verdict == moderation_pb2.VERDICT_BLOCK
    assert [h.category for h in responses[-1].hits] == ["fraud"]
    assert checks(service.metrics, "block") == 1


async def test_server_stream_keeps_the_lexicon_it_started_with(service: Service) -> None:
    first_piece_sent = asyncio.Event()
    reloaded = asyncio.Event()

    async def swap_after_first_piece() -> None:
        await wait_until(lambda: service.metrics.registry.get_sample_value(
            "kefu_moderation_check_duration_seconds_count", {"kind": "stream"}) == 1)
        first_piece_sent.set()
        write_files(service.folder, BANANAS)
        assert await service.lexicon.reload() is ReloadResult.OK
        reloaded.set()

    swapper = asyncio.create_task(swap_after_first_piece())
    responses = await stream_in_lockstep(service.stub, PIECES, before_piece={1: reloaded})
    await swapper
    assert "".join(r.safe_delta for r in responses) == UNDER_APPLES
    reply = await service.stub.Check(moderation_pb2.CheckRequest(text=TEXT), timeout=5)
    assert reply.masked_text == UNDER_BANANAS  # new calls get the new lexicon


async def test_server_lexicon_reload_under_load_drops_no_request(service: Service) -> None:
    """Many concurrent Check and CheckStream calls while the folder is rewritten over and over."""
    completed = 0
    outcomes: set[str] = set()
    writing_done = asyncio.Event()
    stop_watching = asyncio.Event()
    # The service's own watcher runs too, reloading on the same changes as the direct calls.
    watcher = asyncio.create_task(service.lexicon.watch(stop_watching, quiet_ms=20, debounce_ms=200))

    async def unary_client() -> None:
        nonlocal completed
        while not writing_done.is_set():
            reply = await service.stub.Check(moderation_pb2.CheckRequest(tenant="t1", text=TEXT), timeout=10)
            assert reply.masked_text in (UNDER_APPLES, UNDER_BANANAS), reply.masked_text
            outcomes.add(reply.masked_text)
            completed += 1

    async def stream_client() -> None:
        nonlocal completed
        while not writing_done.is_set():
            responses = await stream_in_lockstep(service.stub, PIECES)
            released = "".join(r.safe_delta for r in responses)
            assert released in (UNDER_APPLES, UNDER_BANANAS), released
            outcomes.add(released)
            completed += 1

    async def writer() -> None:
        try:
            for round_, files in zip(range(24), itertools.cycle([BANANAS, APPLES])):
                if round_ % 4 == 3:
                    # A broken version between two good ones: refused, the old one keeps serving.
                    write_files(service.folder, {"fruit.txt": "# action: nuke\n苹果\n"})
                    assert await service.lexicon.reload() is ReloadResult.REFUSED
                write_files(service.folder, files)
                assert await service.lexicon.reload() in (ReloadResult.OK, ReloadResult.UNCHANGED)
                # More completions than calls in flight (16): some started on the new lexicon.
                target = completed + 20

                def caught_up(target: int = target) -> bool:
                    return completed >= target

                await wait_until(caught_up)
        finally:
            writing_done.set()

    try:
        await asyncio.gather(writer(), *(unary_client() for _ in range(8)), *(stream_client() for _ in range(8)))
    finally:
        stop_watching.set()
        await watcher
    assert outcomes == {UNDER_APPLES, UNDER_BANANAS}
    assert completed >= 24 * 20
    assert service.lexicon.generation >= 12 and reload_count(service.metrics, "refused") >= 6
    assert checks(service.metrics, "mask") == completed
