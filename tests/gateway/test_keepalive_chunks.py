"""The keepalive's round over an edge's sockets is spread over its interval, a chunk at a time: at tens of
thousands of sockets one pass held the loop (and every message behind it) for half a second (issue 19)."""

from __future__ import annotations

import asyncio
import time

from gateway.live.connection import Connection
from gateway.live.keepalive import CHUNK, Keepalive

HEARTBEAT_S = 0.4
SOCKETS = CHUNK * 4 + 10


class RecordingTransport(asyncio.Transport):
    """Where a Connection writes its pings: the loop turn of each is recorded."""

    def __init__(self, turns: list[int], turn: list[int]) -> None:
        super().__init__()
        self._turns, self._turn = turns, turn

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._turns.append(self._turn[0])

    def is_closing(self) -> bool:
        return False


async def test_a_round_of_pings_goes_out_in_chunks_spread_over_the_interval() -> None:
    turns: list[int] = []
    turn = [0]
    silent_since = time.monotonic() - 2 * HEARTBEAT_S
    sockets = []
    for _ in range(SOCKETS):
        connection = Connection(None, 8, RecordingTransport(turns, turn))  # type: ignore[arg-type]  # never sends
        connection.heard_at = silent_since
        sockets.append(connection)
    keepalive = Keepalive(lambda: sockets, HEARTBEAT_S)
    keepalive.ensure_running()
    deadline = time.monotonic() + 5
    try:
        while len(turns) < SOCKETS:  # count the loop's turns while the round goes on
            assert time.monotonic() < deadline, f"only {len(turns)} of {SOCKETS} pinged"
            await asyncio.sleep(0)
            turn[0] += 1
    finally:
        await keepalive.aclose()
    per_turn: dict[int, int] = {}
    for seen in turns:
        per_turn[seen] = per_turn.get(seen, 0) + 1
    assert len(turns) == SOCKETS  # each silent socket pinged once in the round
    assert max(per_turn.values()) <= CHUNK  # never more than a chunk in one go
    assert len(per_turn) >= 5  # ceil(SOCKETS / CHUNK) chunks, each in a turn of its own
