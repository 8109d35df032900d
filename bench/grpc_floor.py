"""`python -m bench.grpc_floor`: what the fixed shape's two gRPC calls per chat message cost, with no kefu logic.

A visitor's message crosses two unary gRPC calls on its way in: the edge asks moderation
(Check), then the session service (Append). This starts two grpc.aio servers of an empty
unary method (kefu's own server options and interceptor, the edge's channel options), then
makes two sequential calls per message at `--rate` messages/s, open loop, and reports the
CPU milliseconds per message on the client side and on both servers, with the call latency.
`--multiplexed` makes the same calls as messages of one long-lived bidi stream per server
(an id on each, answers matched by id): what replacing the unary calls by such streams saves.
bench/ws_bench.py adds this to its latency phase: it is the part of kefu's per-message CPU
that no change inside the services can remove while the edge talks gRPC to them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from bench.proc_stats import cpu_seconds
from bench.processes import INTERNAL_TOKEN, stop_process
from gateway.clients import CHANNEL_OPTIONS
from services.common.grpc_client import internal_channel
from services.common.grpc_server import create_grpc_server

log = logging.getLogger("bench.grpc_floor")

METHOD = "/kefu.bench.v1.Floor/Echo"
STREAM_METHOD = "/kefu.bench.v1.Floor/EchoMany"
PAYLOAD = "bench-1 您好，请问我的订单到哪了？".encode() * 4  # about what Check and Append carry


async def serve() -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def echo_many(requests: AsyncIterator[bytes],
                        context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        async for request in requests:  # answered in order: an empty method has nothing to wait for
            yield request

    server = create_grpc_server(CollectorRegistry(), os.environ["KEFU_INTERNAL_TOKEN"])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kefu.bench.v1.Floor", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "EchoMany": grpc.stream_stream_rpc_method_handler(echo_many)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def start_server() -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "--serve"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "KEFU_INTERNAL_TOKEN": INTERNAL_TOKEN})
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError("the gRPC floor server printed no port")
    return process, int(json.loads(line)["port"])


class Multiplexed:
    """Calls as messages of one bidi stream: an id before each payload, the answer found by its id."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        echo_many: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(STREAM_METHOD)
        self._call = echo_many()
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 0
        self._write = asyncio.Lock()  # a grpc.aio stream takes one write at a time
        self._reader = asyncio.create_task(self._read())

    async def __call__(self, payload: bytes) -> bytes:
        self._next_id += 1
        call_id = self._next_id
        answer = self._waiting[call_id] = asyncio.get_running_loop().create_future()
        async with self._write:
            await self._call.write(struct.pack(">I", call_id) + payload)
        return await asyncio.wait_for(answer, 5.0)

    async def _read(self) -> None:
        # isinstance rather than `is not grpc.aio.EOF`: it narrows the read to the payload's type.
        while isinstance(reply := await self._call.read(), bytes):
            (call_id,) = struct.unpack(">I", reply[:4])
            self._waiting.pop(call_id).set_result(reply[4:])

    def close(self) -> None:
        self._reader.cancel()
        self._call.cancel()


async def measure(rate: float, duration_s: float, warmup_s: float, ports: Sequence[int],
                  pids: dict[str, int], *, multiplexed: bool = False) -> dict[str, Any]:
    channels = [internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN, CHANNEL_OPTIONS) for port in ports]
    metadata = (("x-request-id", "0" * 32),)
    streams = [Multiplexed(channel) for channel in channels] if multiplexed else []
    calls: list[Callable[[bytes], Awaitable[bytes]]] = list(streams) or [
        functools.partial(channel.unary_unary(METHOD), timeout=5.0, metadata=metadata) for channel in channels]
    latencies: list[float] = []
    pending: set[asyncio.Task[None]] = set()

    async def message(measured: bool) -> None:
        started = time.perf_counter()
        for call in calls:  # one after the other, as the edge does
            await call(PAYLOAD)
        if measured:
            latencies.append((time.perf_counter() - started) * 1000)

    try:
        for call in calls:
            await call(PAYLOAD)  # connected before anything is timed
        pids = {**pids, "client": os.getpid()}
        total, warmup = int((warmup_s + duration_s) * rate), int(warmup_s * rate)
        started = time.perf_counter()
        cpu_before: dict[str, float | None] = {}
        for number in range(total):
            if number == warmup:
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                window_start = time.perf_counter()
            delay = started + number / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(message(number >= warmup))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        window_s = time.perf_counter() - window_start
        measured = total - warmup
        cpu = {name: ((cpu_seconds(pid) or 0.0) - before) for name, pid in pids.items()
               if (before := cpu_before.get(name)) is not None}
    finally:
        for stream in streams:
            stream.close()
        for channel in channels:
            await channel.close()
    ordered = sorted(latencies)
    return {
        "rate": rate, "messages": measured, "calls_per_message": len(calls), "multiplexed": multiplexed,
        "latency_ms": {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1,
                                                                              int(len(ordered) * 0.99))]},
        "cpu_ms_per_message": {name: round(seconds * 1000 / measured, 3) for name, seconds in cpu.items()},
        "cpu_percent": {name: round(seconds * 100 / window_s) for name, seconds in cpu.items()},
    }


def run(rate: float, duration_s: float, warmup_s: float, *, multiplexed: bool = False) -> dict[str, Any]:
    servers = [start_server() for _ in range(2)]
    try:
        pids = {"moderation-like server": servers[0][0].pid, "session-like server": servers[1][0].pid}
        return asyncio.run(measure(rate, duration_s, warmup_s, [port for _, port in servers], pids,
                                   multiplexed=multiplexed))
    finally:
        for process, _ in servers:
            stop_process(process)
            if process.stdout is not None:
                process.stdout.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__)
    parser.add_argument("--rate", type=float, default=500.0, help="messages per second (two calls each)")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--multiplexed", action="store_true", help="the calls as messages of one bidi stream each")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve())
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args.rate, args.duration_s, args.warmup_s, multiplexed=args.multiplexed)
    print(json.dumps(result, indent=2))
    total = sum(result["cpu_ms_per_message"].values())
    kind = "multiplexed stream messages" if args.multiplexed else "unary gRPC calls"
    print(f"two {kind} per message at {args.rate:g}/s: {total:.2f} ms CPU per message "
          f"({total * args.rate / 1000:.2f} cores), p50 {result['latency_ms']['p50']:.1f} ms, "
          f"p99 {result['latency_ms']['p99']:.1f} ms")


if __name__ == "__main__":
    main()
