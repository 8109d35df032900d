"""Client addresses: parsing, and the visitor's own address behind trusted proxies.

Per-address rate limits and the blacklist's address entries need the visitor's address.
Behind a load balancer or an ingress, the peer is the proxy: every visitor would share one
bucket, and blocking "their" address would block everyone. With KEFU_TRUSTED_PROXIES set, a
peer in those networks is taken at its word: X-Forwarded-For is read from the right, past
every trusted hop, and the first address outside them is the client (what nginx's
`real_ip_recursive` does). A peer outside them is the client, whatever it sends, so nobody
can pick their own address by setting the header. aiohttp-remotes has no such mode: its
strict middleware wants an exact hop count and its filtered one believes any peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import hdrs, web

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """"203.0.113.7" or "203.0.113.0/24" (host bits allowed) or IPv6 -> a network; ValueError otherwise."""
    network = ipaddress.ip_network(text.strip(), strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None \
            and network.prefixlen >= 96:
        network = ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
    return network


def parse_address(text: str | None) -> Address | None:
    """A client address as the edge sees it; IPv4-mapped IPv6 as IPv4; None when it is no IP at all."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddresses:
    def __init__(self, trusted_proxies: Iterable[Network] = ()) -> None:
        self._trusted = tuple(trusted_proxies)

    def _is_trusted(self, address: Address) -> bool:
        return any(address in network for network in self._trusted)

    def of(self, request: web.Request) -> str:
        """The client's address for limits and the blacklist ("unknown" when the peer has none)."""
        peer = request.remote or "unknown"
        if not self._trusted:
            return peer
        address = parse_address(peer)
        if address is None or not self._is_trusted(address):
            return peer
        hops = [hop.strip() for line in request.headers.getall(hdrs.X_FORWARDED_FOR, [])
                for hop in line.split(",") if hop.strip()]
        client = str(address)
        for hop in reversed(hops):
            forwarded = parse_address(hop)
            if forwarded is None:
                break  # garbage from beyond the trusted hops: the last trusted one is what we know
            client = str(forwarded)
            if not self._is_trusted(forwarded):
                break
        return client


def parse_trusted_proxies(text: str) -> tuple[Network, ...]:
    """KEFU_TRUSTED_PROXIES: comma-separated IPs or CIDR networks; ValueError names a bad one."""
    networks = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(parse_network(item))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)
