"""The connection guard's decisions: new-connection rate, refusal streaks, growing penalties, trusted proxies."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client import CollectorRegistry

from gateway.addresses import parse_trusted_proxies
from gateway.connection_guard import ConnectionGuard, GuardLimits, GuardMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Connection(asyncio.Transport):
    """A stand-in for an accepted connection: the guard only keys its streaks by the object."""


def guard(clock: Clock, *, trusted: str = "", registry: CollectorRegistry | None = None, **limits: int
          ) -> ConnectionGuard:
    settings = dataclasses.replace(GuardLimits(connection_rps=2.0, connection_burst=3, max_refusals=3, penalty_s=1.0,
                                               max_penalty_s=4.0, max_addresses=100), **limits)
    return ConnectionGuard(settings, parse_trusted_proxies(trusted),
                           metrics=GuardMetrics(registry) if registry is not None else None, clock=clock)


def test_guard_cuts_an_address_over_its_connection_rate_but_not_another() -> None:
    clock = Clock()
    g = guard(clock)
    assert [g.admit("127.0.0.2") for _ in range(4)] == [None, None, None, "rate"]
    assert g.admit("127.0.0.3") is None
    clock.now += 0.5  # one connection refilled at 2/s
    assert [g.admit("127.0.0.2") for _ in range(2)] == [None, "rate"]


def test_guard_refusals_in_a_row_close_the_connection_and_penalise_the_address() -> None:
    clock = Clock()
    g = guard(clock)
    conn = Connection()
    assert [g.refused(conn, "127.0.0.2") for _ in range(3)] == [False, False, True]
    assert g.admit("127.0.0.2") == "penalty"
    assert g.penalty_left("127.0.0.2") == pytest.approx(1.0)
    assert g.admit("127.0.0.3") is None
    clock.now += 1.01
    assert g.admit("127.0.0.2") is None


def test_guard_a_served_request_ends_the_streak() -> None:
    clock = Clock()
    g = guard(clock)
    conn = Connection()
    for _ in range(5):
        assert g.refused(conn, "127.0.0.2") is False
        assert g.refused(conn, "127.0.0.2") is False
        g.served(conn)
    assert g.admit("127.0.0.2") is None


def test_guard_penalties_double_up_to_the_maximum_and_start_again_after_a_clean_while() -> None:
    clock = Clock()
    g = guard(clock)
    windows = []
    for _ in range(5):
        conn = Connection()
        while not g.refused(conn, "10.0.0.9"):
            pass
        windows.append(round(g.penalty_left("10.0.0.9"), 3))
        clock.now += windows[-1]  # offends again as soon as it may
    assert windows == [1.0, 2.0, 4.0, 4.0, 4.0]
    clock.now += 4.0 + 0.01  # clean for longer than the longest window
    conn = Connection()
    while not g.refused(conn, "10.0.0.9"):
        pass
    assert g.penalty_left("10.0.0.9") == pytest.approx(1.0)


def test_guard_many_connections_ending_in_the_same_window_are_one_offence() -> None:
    clock = Clock()
    g = guard(clock)
    connections = [Connection() for _ in range(10)]
    for _ in range(3):
        closed = [g.refused(conn, "127.0.0.2") for conn in connections]
    assert closed == [True] * 10  # every one of them is closed...
    assert g.penalty_left("127.0.0.2") == pytest.approx(1.0)  # ...but the window is the first one


def test_guard_never_cuts_or_penalises_a_trusted_proxy() -> None:
    clock = Clock()
    g = guard(clock, trusted="10.1.0.0/16")
    assert all(g.admit("10.1.2.3") is None for _ in range(50))
    conn = Connection()
    assert not any(g.refused(conn, "10.1.2.3") for _ in range(50))
    assert g.admit("10.1.2.3") is None and g.penalty_left("10.1.2.3") == 0


def test_guard_counts_an_ipv6_slash_64_as_one_address() -> None:
    clock = Clock()
    g = guard(clock)
    assert [g.admit(f"2001:db8::{n:x}") for n in range(4)] == [None, None, None, "rate"]
    assert g.admit("2001:db8:0:1::1") is None  # another /64
    assert g.admit("::ffff:127.0.0.2") is None and len(g) == 3  # IPv4-mapped: the IPv4 address


def test_guard_memory_is_bounded() -> None:
    clock = Clock()
    g = guard(clock, max_addresses=10)
    for n in range(1000):
        g.admit(f"10.9.{n // 250}.{n % 250}")
    assert len(g) == 10


def test_guard_metrics_count_cuts_by_reason_and_penalties() -> None:
    clock, registry = Clock(), CollectorRegistry()
    g = guard(clock, registry=registry)
    for _ in range(5):
        g.admit("127.0.0.2")
    conn = Connection()
    while not g.refused(conn, "127.0.0.3"):
        pass
    g.admit("127.0.0.3")
    assert registry.get_sample_value("kefu_connections_cut_total", {"reason": "rate"}) == 2
    assert registry.get_sample_value("kefu_connections_cut_total", {"reason": "penalty"}) == 1
    assert registry.get_sample_value("kefu_connection_penalties_total") == 1
    assert registry.get_sample_value("kefu_connection_guard_addresses") == 2


def test_guard_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        GuardLimits(penalty_s=10.0, max_penalty_s=1.0)
    with pytest.raises(ValueError):
        GuardLimits(connection_rps=0)
