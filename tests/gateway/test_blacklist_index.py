"""The blacklist's per-tenant index answers exactly what testing each listed network in turn would."""

from __future__ import annotations

import ipaddress
import random

from gateway.addresses import parse_address, parse_network
from gateway.directory.blacklist import BlacklistEntry, TenantIndex

NETWORKS = ["0.0.0.0/0", "10.0.0.0/8", "192.0.2.7", "198.51.100.0/24", "198.51.100.128/25", "203.0.113.77/31",
            "2001:db8::/32", "2001:db8:1:2::/64", "2001:db8::1", "::ffff:192.0.2.0/120", "fe80::/10", "::/0"]
NEAR = ["10.1.2.3", "11.0.0.1", "192.0.2.7", "192.0.2.8", "198.51.100.127", "198.51.100.128", "203.0.113.76",
        "203.0.113.77", "203.0.113.78", "2001:db8::1", "2001:db8::2", "2001:db9::1", "2001:db8:1:2:ffff::1",
        "2001:db8:1:3::1", "::ffff:192.0.2.9", "::ffff:10.0.0.1", "fe80::1", "febf::1", "fec0::1", "::1"]
"""Addresses on and beside the listed networks' edges."""


def index_of(networks: list[str], visitors: tuple[str, ...] = ()) -> TenantIndex:
    entries = [BlacklistEntry(f"n{i}", "shop1", "", str(parse_network(n)), "", 0.0, "") for i, n in enumerate(networks)]
    entries += [BlacklistEntry(f"v{i}", "shop1", v, "", "", 0.0, "") for i, v in enumerate(visitors)]
    return TenantIndex.of(entries)


def each_in_turn(networks: list[str], address: str) -> bool:
    ip = parse_address(address)
    return ip is not None and any(ip in parse_network(n) for n in networks)


def test_blacklist_index_matches_each_network_in_turn() -> None:
    rng = random.Random(17)
    addresses = NEAR + [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(300)] \
        + [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(300)]
    for networks in (NETWORKS, NETWORKS[1:-1], NETWORKS[2:6], NETWORKS[6:-1], ["192.0.2.7"], ["2001:db8::1"]):
        index = index_of(networks)
        for address in addresses:
            ip = parse_address(address)
            assert ip is not None
            assert index.holds(ip) == each_in_turn(networks, address), (networks, address)


def test_blacklist_index_keeps_visitors_and_networks_apart() -> None:
    index = index_of(["198.51.100.0/24"], ("v_troll",))
    assert index.visitors == frozenset({"v_troll"})
    assert len(index.prefixes) == 1 and index.prefixes[0] == (4, 24)
    assert index.holds(ipaddress.IPv4Address("198.51.100.9")) and not index.holds(ipaddress.IPv4Address("198.51.101.9"))
    assert not index_of([], ("v_troll",)).networks
