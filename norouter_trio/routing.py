"""The manager's routing table: which agent owns an IPv4 destination (behaviour.md §5).

Order: (1) a VIP routes to itself; (2) learned routes from ``routeSuggestion`` events, an LRU
of 512 entries; (3) ``toCIDR`` routes, later routes winning; (4) the address itself.  The
answer is the owner's VIP, or None when no agent has that VIP.  Addresses are 4-byte
``bytes`` (``packet[16:20]``) so the switch needs no conversion per packet.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

LEARNED_MAX = 512
#: Cache of CIDR / self decisions; cleared when it grows past this (a flood of random
#: destinations must not grow memory).
CACHE_MAX = 4096


def ip_bytes(ip: str) -> bytes:
    """``"127.0.42.101"`` → 4 bytes; raises ValueError naming the address."""
    return ipaddress.IPv4Address(ip).packed


def ip_str(addr: bytes) -> str:
    return str(ipaddress.IPv4Address(addr))


class RoutingTable:
    """VIPs, learned routes and CIDR routes; ``resolve`` is on the packet path."""

    def __init__(self, vips: Iterable[str] = ()) -> None:
        self._vips: dict[bytes, bytes] = {}
        for v in vips:
            b = ip_bytes(v)
            self._vips[b] = b
        self._learned: OrderedDict[bytes, bytes] = OrderedDict()
        # (network int, mask int, via) in manifest order; scanned from the end.
        self._cidrs: list[tuple[int, int, bytes]] = []
        self._cache: dict[bytes, bytes | None] = {}

    def add_cidr_route(self, cidr: str, via: str) -> None:
        net = ipaddress.IPv4Network(cidr, strict=False)
        self._cidrs.append((int(net.network_address), int(net.netmask), ip_bytes(via)))
        self._cache.clear()

    def learn(self, ips: Iterable[str], via: str) -> list[str]:
        """Remember ``ips`` as reached through ``via``; return the addresses accepted."""
        via_b = ip_bytes(via)
        accepted: list[str] = []
        for ip in ips:
            try:
                b = ip_bytes(ip)
            except ValueError:
                continue
            self._learned[b] = via_b
            self._learned.move_to_end(b)
            accepted.append(ip)
        while len(self._learned) > LEARNED_MAX:
            self._learned.popitem(last=False)
        return accepted

    def learned(self) -> list[tuple[str, str]]:
        """The learned table as ``(ip, via)``, least recently used first."""
        return [(ip_str(k), ip_str(v)) for k, v in self._learned.items()]

    def cidr_routes(self) -> list[tuple[str, str]]:
        return [(f"{ipaddress.IPv4Address(n)}/{bin(m).count('1')}", ip_str(v))
                for n, m, v in self._cidrs]

    def resolve(self, dst: bytes) -> bytes | None:
        """The VIP that owns ``dst`` (4 bytes), or None when no agent does."""
        owner = self._vips.get(dst)
        if owner is not None:
            return owner
        learned = self._learned.get(dst)
        if learned is not None:
            self._learned.move_to_end(dst)
            return learned if learned in self._vips else None
        try:
            return self._cache[dst]
        except KeyError:
            pass
        a = int.from_bytes(dst, "big")
        target = dst
        for net, mask, via in reversed(self._cidrs):
            if a & mask == net:
                target = via
                break
        result = target if target in self._vips else None
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[dst] = result
        return result
