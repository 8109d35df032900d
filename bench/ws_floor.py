"""`python -m bench.ws_floor`: a plain aiohttp WebSocket relay, the floor kefu's live chat is measured against.

It speaks just enough of the live-chat frames for bench/ws_bench.py: `hello` gets `welcome`;
`claim {conversation_id, cid}` (or a visitor's `hello {conversation_id}`) puts the socket in
that conversation's room and gets `ack {cid}`; `send {cid, conversation_id, text}` becomes one
`msg` frame sent to every socket of the room, the sender's included, as kefu does. No auth, no
storage, no other process: what is left is aiohttp, JSON and the sockets themselves.

It prints `ws floor listening on http://127.0.0.1:<port>` on its first line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import time
from typing import Any

from aiohttp import WSMsgType, web

MAX_FRAME_BYTES = 65536
ROOMS = web.AppKey("rooms", dict[str, set[web.WebSocketResponse]])
HEARTBEAT_S = web.AppKey("heartbeat_s", float)


async def relay(request: web.Request) -> web.WebSocketResponse:
    # The same socket options as the edge's /v1/ws: frame limit, no compression, server heartbeat.
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, compress=False, autoping=True,
                               heartbeat=request.app[HEARTBEAT_S])
    await ws.prepare(request)
    rooms = request.app[ROOMS]
    joined: set[str] = set()
    seq = 0
    try:
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                break
            frame: dict[str, Any] = json.loads(message.data)
            kind = frame.get("type")
            if kind == "hello":
                if room := frame.get("conversation_id"):
                    rooms.setdefault(room, set()).add(ws)
                    joined.add(room)
                await ws.send_str(json.dumps({"type": "welcome", "conversation_id": room}))
            elif kind == "claim":
                room = frame["conversation_id"]
                rooms.setdefault(room, set()).add(ws)
                joined.add(room)
                await ws.send_str(json.dumps({"type": "ack", "cid": frame.get("cid")}))
            elif kind == "send":
                seq += 1
                out = json.dumps({"type": "msg", "conversation_id": frame["conversation_id"], "seq": seq,
                                  "ts": int(time.time() * 1000), "sender": {"type": "visitor", "id": "floor"},
                                  "text": frame["text"]}, ensure_ascii=False)
                for peer in list(rooms.get(frame["conversation_id"], ())):
                    await peer.send_str(out)
                await ws.send_str(json.dumps({"type": "ack", "cid": frame.get("cid"), "seq": seq}))
            elif kind == "ping":
                await ws.send_str('{"type": "pong"}')
    finally:
        for room in joined:
            members = rooms.get(room)
            if members is not None:
                members.discard(ws)
                if not members:
                    del rooms[room]
    return ws


async def serve(port: int, heartbeat_s: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = web.Application()
    app[ROOMS] = {}
    app[HEARTBEAT_S] = heartbeat_s
    app.router.add_get("/ws", relay)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"ws floor listening on http://127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_floor", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat-s", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.heartbeat_s))


if __name__ == "__main__":
    main()
