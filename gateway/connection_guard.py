"""Per-address admission at accept: a new-connection rate, and penalty windows after sustained refusals."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.addresses import Network, parse_address
from gateway.settings import GatewaySettings

Cut = Literal["rate", "penalty"]
"""Why a connection was closed at accept: its address opened connections too fast, or is in a penalty window."""


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """Issue 17: a closed-loop attacker refused per request still cost the edge 0.7 of a core (HTTP parsing,
    JWT, JSON, 2,000 requests a second). These limits refuse it before any of that, at accept."""

    connection_rps: float = 50.0
    """New connections an address may open a second (IPv6: per /64), sustained."""
    connection_burst: int = 500
    """New connections an address may open at once (a NAT with many browsers opening pages)."""
    max_refusals: int = 20
    """Consecutive refused requests (429) on one keep-alive connection before it is closed and its address
    penalised: a client that honours Retry-After never gets there."""
    penalty_s: float = 1.0
    """The first penalty window; each further one within `max_penalty_s` of the last doubles it."""
    max_penalty_s: float = 60.0
    max_addresses: int = 50_000
    """Addresses remembered (least recently seen forgotten first, ~270 bytes each: 13.5 MB at the default)."""

    def __post_init__(self) -> None:
        if self.connection_rps <= 0 or self.connection_burst < 1 or self.max_refusals < 1:
            raise ValueError("connection_rps, connection_burst and max_refusals must be positive")
        if not 0 < self.penalty_s <= self.max_penalty_s or self.max_addresses < 1:
            raise ValueError("need 0 < penalty_s <= max_penalty_s and max_addresses >= 1")


@dataclass(slots=True)
class _Peer:
    tokens: float
    updated: float
    exempt: bool
    penalty_until: float = 0.0
    strikes: int = 0


class GuardMetrics:
    """The guard's counters, bound to their labels once (a refusal must stay cheap)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cuts = Counter("kefu_connections_cut", "Connections closed at accept, before any HTTP parsing, by "
                            "why: rate (the address opened too many), penalty (the address is in a penalty window).",
                            ["reason"], registry=registry)
        self.cut: dict[Cut, Counter] = {"rate": self.cuts.labels("rate"), "penalty": self.cuts.labels("penalty")}
        self.penalties = Counter("kefu_connection_penalties", "Penalty windows given to an address after one of "
                                 "its connections had too many refusals in a row.", registry=registry)
        self.tracked = Gauge("kefu_connection_guard_addresses", "Addresses the connection guard remembers.",
                             registry=registry)


class ConnectionGuard:
    """One per edge process. `admit` runs at accept; `refused`/`served` after each request.

    A trusted proxy's address (KEFU_TRUSTED_PROXIES) is never cut nor penalised: every visitor behind it
    shares it. The per-request limits still apply to the visitors behind it, and the proxy itself must limit
    connections per client (docs/api.md, "Connection guard").
    """

    def __init__(self, limits: GuardLimits, trusted: Iterable[Network] = (), *, metrics: GuardMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._trusted = tuple(trusted)
        self._metrics = metrics
        self._clock = clock
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._streaks: weakref.WeakKeyDictionary[asyncio.BaseTransport, int] = weakref.WeakKeyDictionary()
        """Refusals in a row per open connection (gone with the connection)."""

    @classmethod
    def of(cls, settings: GatewaySettings, registry: CollectorRegistry) -> ConnectionGuard:
        return cls(GuardLimits(settings.conn_rps, settings.conn_burst, settings.conn_max_refusals,
                               settings.conn_penalty_s, settings.conn_max_penalty_s, settings.conn_max_addresses),
                   settings.trusted_proxies, metrics=GuardMetrics(registry))

    def __len__(self) -> int:
        return len(self._peers)

    def admit(self, host: str) -> Cut | None:
        """None to serve a new connection from `host`, or why to close it at once."""
        now = self._clock()
        peer = self._peer(host, now)
        if peer.exempt:
            return None
        if peer.penalty_until > now:
            return self._cut("penalty")
        limits = self.limits
        peer.tokens = min(float(limits.connection_burst), peer.tokens + (now - peer.updated) * limits.connection_rps)
        peer.updated = now
        if peer.tokens < 1:
            return self._cut("rate")
        peer.tokens -= 1
        return None

    def refused(self, transport: asyncio.BaseTransport, host: str) -> bool:
        """A request on this connection was refused (429): True when the connection must close now (its
        address is then in a penalty window)."""
        streak = self._streaks.get(transport, 0) + 1
        if streak < self.limits.max_refusals:
            self._streaks[transport] = streak
            return False
        now = self._clock()
        peer = self._peer(host, now)
        if peer.exempt:
            self._streaks.pop(transport, None)
            return False
        self._streaks.pop(transport, None)
        self.penalise(peer, now)
        return True

    def served(self, transport: asyncio.BaseTransport) -> None:
        """A request on this connection was not refused: its streak starts again."""
        if self._streaks:
            self._streaks.pop(transport, None)

    def penalty_left(self, host: str) -> float:
        """Seconds until `host` may connect again (0 when it may now)."""
        peer = self._peers.get(_key(host))
        return max(0.0, peer.penalty_until - self._clock()) if peer is not None else 0.0

    def penalise(self, peer: _Peer, now: float) -> None:
        limits = self.limits
        if now < peer.penalty_until:
            return  # another of its connections already earned this window: one offence, one doubling
        if now - peer.penalty_until > limits.max_penalty_s:
            peer.strikes = 0  # clean for a while: start again at the first window
        peer.strikes = min(peer.strikes + 1, 32)
        peer.penalty_until = now + min(limits.max_penalty_s, limits.penalty_s * 2 ** (peer.strikes - 1))
        if self._metrics is not None:
            self._metrics.penalties.inc()

    def protocol_factory(self, serve: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.BaseProtocol]:
        """Wrap a server's protocol factory (aiohttp's web.Server) so every accepted connection passes `admit`
        first; an admitted one is handed to a protocol of `serve` and costs nothing more."""
        return lambda: _Gate(self, serve)

    def _peer(self, host: str, now: float) -> _Peer:
        key = _key(host)
        peer = self._peers.get(key)
        if peer is not None:
            self._peers.move_to_end(key)
            return peer
        address = parse_address(host)
        exempt = address is not None and any(address in network for network in self._trusted)
        peer = self._peers[key] = _Peer(float(self.limits.connection_burst), now, exempt)
        if len(self._peers) > self.limits.max_addresses:
            # A forgotten address starts with a full bucket: an attacker that rotates addresses faster than
            # this table holds them is bounded by the per-request limits instead.
            self._peers.popitem(last=False)
        if self._metrics is not None:
            self._metrics.tracked.set(len(self._peers))
        return peer

    def _cut(self, reason: Cut) -> Cut:
        if self._metrics is not None:
            self._metrics.cut[reason].inc()
        return reason


def _key(host: str) -> str:
    """The address a limit counts against: an IPv4 address, or an IPv6 address's /64 (one host can hold a
    whole /64, so per-address IPv6 limits would be no limits)."""
    if ":" not in host:
        return host
    address = parse_address(host)
    if address is None or address.version == 4:
        return str(address) if address is not None else host
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class _Gate(asyncio.Protocol):
    """The protocol an accepted connection starts with: closes it at once when its address is not admitted,
    otherwise swaps in aiohttp's own protocol (transport.set_protocol: no extra call on any later byte)."""

    def __init__(self, guard: ConnectionGuard, serve: Callable[[], asyncio.BaseProtocol]) -> None:
        self._guard = guard
        self._serve = serve

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else ""
        if host and self._guard.admit(host) is not None:
            transport.close()  # no HTTP answer: a 429 would cost what the guard saves
            return
        protocol = self._serve()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # only a connection cut at accept ends here; an admitted one ends at aiohttp's protocol


class GuardedSite(web.TCPSite):
    """aiohttp's TCPSite with `guard` around the runner's protocol factory (start() is TCPSite.start of aiohttp
    3.14 with that one change; aiohttp has no hook for it)."""

    __slots__ = ("_guard",)

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, *,
                 reuse_port: bool = False, backlog: int = 128) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port, backlog=backlog)
        self._guard = guard

    async def start(self) -> None:
        self._runner._reg_site(self)  # BaseSite.start
        server = self._runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before starting a site")
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
