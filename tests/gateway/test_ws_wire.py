"""The socket after its handshake (gateway/live/wire.py, upgrade.py, socket.py): aiohttp lets go of it, and
every frame behaviour the read loop had stays, byte for byte where it matters."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct

import pytest
from aiohttp import ClientWebSocketResponse, WSMessage, WSMsgType, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from devtools.mint_token import mint
from gateway.app import create_app
from gateway.live import socket as live_socket
from gateway.live.frames import MAX_FRAME_BYTES
from gateway.live.wire import Wire, frame
from gateway.settings import GatewaySettings

SECRET = "wire-test-secret-0123456789abcdef0123"
SOCKETS = 20


def settings() -> GatewaySettings:
    # Backends point nowhere: a hello without resume needs none of them.
    return GatewaySettings(jwt_secret=SECRET, session_addr="127.0.0.1:9", moderation_addr="127.0.0.1:9",
                           worker_addr="127.0.0.1:9", ws_heartbeat_s=30, rpc_timeout_s=0.5)


def bearer(subject: str = "v1") -> str:
    return f"Bearer {mint(SECRET, tenant='shop1', subject=subject, role='visitor', ttl_s=60)}"


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.3: a client always masks)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    else:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    return header + mask + masked


def upgrade_request(authorization: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Authorization: {authorization}\r\n" if authorization else ""
    return (f"GET /v1/ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


class RawSocket:
    """A client that reads the server's frames itself (unmasked, as a server sends them)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, client: TestClient[web.Request, web.Application], first: bytes) -> RawSocket:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(first)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    async def next_frame(self) -> tuple[int, bytes]:
        first, second = await asyncio.wait_for(self.reader.readexactly(2), 5)
        assert second & 0x80 == 0, "a server frame is never masked"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_idle_sockets_hold_no_task_and_aiohttp_forgets_them(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    runner = client.server.runner
    assert runner is not None and runner.server is not None
    server = runner.server

    async def greeted(i: int) -> ClientWebSocketResponse:
        ws = await client.ws_connect("/v1/ws", headers={"Authorization": bearer(f"v{i}")})
        await ws.send_json({"type": "hello"})
        assert (await ws.receive_json(timeout=15))["type"] == "welcome"
        return ws

    sockets = [await greeted(0)]
    await asyncio.sleep(0.05)  # the handler's task finishes
    tasks_with_one = len(asyncio.all_tasks())
    sockets += await asyncio.gather(*(greeted(i) for i in range(1, SOCKETS + 1)))
    await asyncio.sleep(0.05)
    # Twenty more open, greeted, idle sockets: not one more task (aiohttp's read loop had two per socket).
    assert len(asyncio.all_tasks()) <= tasks_with_one
    assert server.connections == []  # aiohttp holds none of them (their handlers and requests are freed)
    for ws in sockets:  # and they still work
        await ws.send_json({"type": "ping"})
    for ws in sockets:
        assert await ws.receive_json(timeout=5) == {"type": "pong"}
        await ws.close()
        assert ws.close_code == 1000


async def test_a_frame_sent_with_the_upgrade_request_is_read(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    hello = json.dumps({"type": "hello"}).encode()
    raw = await RawSocket.open(client, upgrade_request(bearer()) + client_frame(0x1, hello))
    opcode, payload = await raw.next_frame()
    assert opcode == 0x1 and json.loads(payload)["type"] == "welcome"
    await raw.close()


async def test_frames_before_the_clients_close_are_answered_then_the_close(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    raw = await RawSocket.open(client, upgrade_request(bearer()))
    raw.writer.write(client_frame(0x1, b'{"type":"hello"}') + client_frame(0x1, b'{"type":"ping"}')
                     + client_frame(0x8, struct.pack("!H", 1000) + b"bye"))
    assert json.loads((await raw.next_frame())[1])["type"] == "welcome"
    assert await raw.next_frame() == (0x1, b'{"type":"pong"}')
    assert await raw.next_frame() == (0x8, struct.pack("!H", 1000))
    assert await raw.at_eof()
    await raw.close()


async def test_a_websocket_ping_is_answered_with_its_payload(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    ws = await client.ws_connect("/v1/ws", headers={"Authorization": bearer()}, autoping=False)
    await ws.ping(b"are you there")
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.PONG and message.data == b"are you there"
    await ws.close()


async def test_an_oversized_frame_closes_the_socket_with_1009(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    ws = await client.ws_connect("/v1/ws", headers={"Authorization": bearer()})
    await ws.send_str(json.dumps({"type": "hello", "pad": "x" * MAX_FRAME_BYTES}))
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE and ws.close_code == 1009


async def test_invalid_utf8_text_closes_the_socket_with_1007(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(settings()))
    raw = await RawSocket.open(client, upgrade_request(bearer()))
    raw.writer.write(client_frame(0x1, b'{"type":"\xff"}'))
    opcode, payload = await raw.next_frame()
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1007)
    assert await raw.at_eof()
    await raw.close()


async def test_a_socket_without_hello_is_closed_4001_by_its_timer(aiohttp_client: AiohttpClient,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_socket, "HELLO_TIMEOUT_S", 0.3)
    client = await aiohttp_client(create_app(settings()))
    ws = await client.ws_connect("/v1/ws")
    error = await ws.receive_json(timeout=5)
    assert error["type"] == "error" and error["code"] == "unauthorized"
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE and ws.close_code == 4001


async def test_a_peer_that_never_answers_our_close_is_cut(aiohttp_client: AiohttpClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_socket, "HELLO_TIMEOUT_S", 0.1)
    monkeypatch.setattr("gateway.handlers.ws.CLOSE_TIMEOUT_S", 0.3)
    client = await aiohttp_client(create_app(settings()))
    raw = await RawSocket.open(client, upgrade_request())
    assert (await raw.next_frame())[0] == 0x1  # the error frame
    opcode, payload = await raw.next_frame()
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 4001)
    assert await raw.at_eof()  # we never sent our close: the edge ended the transport after its close timeout
    await raw.close()


def test_server_frames_use_the_shortest_length_encoding() -> None:
    assert frame(0x1, b"x" * 125)[:2] == bytes([0x81, 125])
    assert frame(0x1, b"x" * 126)[:4] == bytes([0x81, 126, 0, 126])
    assert frame(0x1, b"x" * 65536)[:10] == bytes([0x81, 127]) + (65536).to_bytes(8, "big")
    assert frame(0xA, b"")[:2] == bytes([0x8A, 0])


class Recorder:
    """A FrameSink that keeps what it is given."""

    def __init__(self) -> None:
        self.frames: list[tuple[WSMsgType, object]] = []
        self.ended = False

    def on_frame(self, message: WSMessage) -> None:
        self.frames.append((message.type, message.data))

    def on_end(self) -> None:
        self.ended = True


async def test_the_wire_parses_frames_split_anywhere_in_order() -> None:
    wire = Wire(asyncio.get_running_loop(), max_frame_bytes=1000, close_timeout_s=1.0)
    sink = Recorder()
    wire._sink = sink
    texts = [json.dumps({"n": i, "pad": "界" * i}) for i in range(60)]
    data = b"".join(client_frame(0x1, text.encode()) for text in texts) + client_frame(0x9, b"p")
    for start in range(0, len(data), 7):  # seven bytes at a time: headers, masks and payloads cut anywhere
        wire.data_received(data[start:start + 7])
    assert sink.frames == [(WSMsgType.TEXT, text) for text in texts] + [(WSMsgType.PING, b"p")]
