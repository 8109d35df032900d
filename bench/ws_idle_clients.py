"""`python -m bench.ws_idle_clients`: a client process of the idle-socket phase (bench/ws_idle_phase.py).

It opens `--count` WebSockets, each saying `hello` (with a visitor token of its own for kefu)
and waiting for `welcome`, then holds them idle, answering the server's pings. It talks to its
parent in JSON lines: it prints `{"ready": ...}` once its tokens are minted, opens the sockets
on `go`, prints what it opened, prints how many are still open on `check`, and closes them all
and exits on `close` (or when stdin ends). Run as its own process so the client side of 10,000
sockets is not the bottleneck of the edge it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from devtools.mint_token import mint

SECRET_ENV = "KEFU_BENCH_JWT_SECRET"
TENANT = "bench"
WELCOME_TIMEOUT_S = 60.0


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class Holder:
    def __init__(self, url: str, parallel: int) -> None:
        self.url = url
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.readers: list[asyncio.Task[None]] = []
        self.errors: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.connect_ms: list[float] = []
        self.in_conversation = 0
        """Sockets whose welcome named a conversation (the visitor had an open one)."""
        self._gate = asyncio.Semaphore(parallel)

    async def open_one(self, http: aiohttp.ClientSession, hello: dict[str, Any]) -> None:
        async with self._gate:
            started = time.perf_counter()
            try:
                ws = await http.ws_connect(self.url, autoping=True, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(
                    ws_close=5.0))
                await ws.send_str(json.dumps(hello))
                message = await ws.receive(timeout=WELCOME_TIMEOUT_S)
                welcome = json.loads(message.data) if message.type is aiohttp.WSMsgType.TEXT else {}
                if welcome.get("type") != "welcome":
                    self.errors[f"no welcome: {message.type.name} {str(message.data)[:80]}"] += 1
                    await ws.close()
                    return
                self.in_conversation += bool(welcome.get("conversation_id"))
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                self.errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1
                return
            self.connect_ms.append((time.perf_counter() - started) * 1000)
            self.sockets.append(ws)
            # Reading is what answers the server's heartbeat pings (autoping happens in receive()).
            self.readers.append(asyncio.create_task(self._read(ws)))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for _ in ws:
            pass
        self.close_codes[str(ws.close_code)] += 1

    def still_open(self) -> int:
        return sum(1 for ws in self.sockets if not ws.closed)


async def run(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    secret = os.environ.get(SECRET_ENV, "")
    hellos: list[dict[str, Any]] = []
    for number in range(args.first, args.first + args.count):
        hello: dict[str, Any] = {"type": "hello"}
        if args.mode == "kefu":
            hello["token"] = mint(secret, tenant=args.tenant, subject=f"{args.subject_prefix}{number}",
                                  role="visitor", ttl_s=3600)
        hellos.append(hello)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit({"ready": True, "open_files_limit": hard})
    holder = Holder(args.url, args.parallel)
    # A source address of its own per client process: one address runs out of ports near 28k sockets.
    local_addr = (args.local_address, 0) if args.local_address else None
    connector = aiohttp.TCPConnector(limit=0, force_close=True, local_addr=local_addr)
    async with aiohttp.ClientSession(connector=connector) as http:
        while line := (await reader.readline()).decode().strip():
            if line == "go":
                started = time.perf_counter()
                await asyncio.gather(*(holder.open_one(http, hello) for hello in hellos))
                emit({"opened": len(holder.sockets), "failed": sum(holder.errors.values()),
                      "errors": dict(holder.errors.most_common(5)), "in_conversation": holder.in_conversation,
                      "seconds": time.perf_counter() - started,
                      "connect_ms": sorted(holder.connect_ms)})
            elif line == "check":
                emit({"open": holder.still_open(), "close_codes": dict(holder.close_codes)})
            elif line == "close":
                break
        await asyncio.gather(*(ws.close() for ws in holder.sockets), return_exceptions=True)
        for task in holder.readers:
            task.cancel()
        await asyncio.gather(*holder.readers, return_exceptions=True)
    emit({"closed": len(holder.sockets)})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_idle_clients", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=("kefu", "floor"), default="kefu")
    parser.add_argument("--first", type=int, default=0, help="number of the first visitor (distinct tokens)")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=100, help="handshakes in flight at once")
    parser.add_argument("--tenant", default=TENANT)
    parser.add_argument("--subject-prefix", default="idle-", help="visitor N's JWT sub is this and N")
    parser.add_argument("--local-address", default="", help="source address of the sockets (e.g. 127.0.0.2)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
