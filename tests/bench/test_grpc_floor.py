"""bench/grpc_floor.py measures two real gRPC calls per message, and ws_bench adds them up correctly."""

from __future__ import annotations

import pytest

from bench import grpc_floor
from bench.ws_report import shape_floor_lines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("multiplexed", [False, True])
def test_grpc_floor_makes_two_calls_per_message_to_two_real_servers(multiplexed: bool) -> None:
    result = grpc_floor.run(rate=40.0, duration_s=0.5, warmup_s=0.25, multiplexed=multiplexed)
    assert result["messages"] == 20 and result["calls_per_message"] == 2 and result["multiplexed"] is multiplexed
    assert set(result["cpu_ms_per_message"]) == {"moderation-like server", "session-like server", "client"}
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]


def test_shape_floor_adds_the_parts_measured_in_the_run() -> None:
    latency = {"grpc_floor": {"cpu_ms_per_message": {"a": 1.0, "b": 0.5, "client": 0.5},
                              "latency_ms": {"p50": 2.0, "p99": 9.0}},
               "floor": {"cpu_ms_per_message": {"floor": 0.25, "client": 0.4}}}
    kefu = {"cpu_ms_per_message": {"nats": 0.5, "client": 0.25, "session": 3.0}}
    text = "".join(shape_floor_lines(latency, kefu, 2, 500))
    # 2.0 (gRPC) + 0.5 (nats) + 0.25 (client) + 0.25 (relay) = 3.0 ms -> 1.5 cores at 500/s
    assert "3.00 ms in all" in text and "1.50 of this machine's 2 cores" in text
    assert shape_floor_lines({"grpc_floor": {"error": "boom"}}, kefu, 2, 500) == []
