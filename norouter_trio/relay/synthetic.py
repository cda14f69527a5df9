"""A synthetic manager and TCP traffic for exercising the relay without agents.

Used by the relay's tests and benchmark (and handy to look at the page without a network):
`SyntheticManager` has the shape the relay reads from the real manager (hosts with counters,
`add_observer`), and `TcpConversation` produces real IPv4/TCP packets, checksums included,
so that tcpdump and Wireshark read the pcap download like a real capture.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .flows import ACK, FIN, PSH, RST, SYN


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_packet(
    src: str, sport: int, dst: str, dport: int, *, seq: int, ack: int, flags: int,
    payload: bytes = b"", window: int = 65535, ident: int = 0,
) -> bytes:
    """One IPv4/TCP packet with valid IPv4 and TCP checksums."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      5 << 4, flags, window, 0, 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    csum = _checksum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident & 0xFFFF, 0x4000, 64, 6, 0,
                     s, d)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


@dataclass
class TcpConversation:
    """A client/server TCP exchange: handshake, data both ways, then FIN (or RST)."""

    client_host: str
    client_ip: str
    sport: int
    server_host: str
    server_ip: str
    dport: int
    cseq: int = 1000
    sseq: int = 5000
    ident: int = 0

    def _pkt(self, from_client: bool, flags: int, payload: bytes = b"") -> tuple[str, str, bytes]:
        self.ident += 1
        if from_client:
            p = tcp_packet(self.client_ip, self.sport, self.server_ip, self.dport, seq=self.cseq,
                           ack=self.sseq, flags=flags, payload=payload, ident=self.ident)
            self.cseq += len(payload) + (1 if flags & (SYN | FIN) else 0)
            return self.client_host, self.server_host, p
        p = tcp_packet(self.server_ip, self.dport, self.client_ip, self.sport, seq=self.sseq,
                       ack=self.cseq, flags=flags, payload=payload, ident=self.ident)
        self.sseq += len(payload) + (1 if flags & (SYN | FIN) else 0)
        return self.server_host, self.client_host, p

    def handshake(self) -> list[tuple[str, str, bytes]]:
        first = self._pkt(True, SYN)
        second = self._pkt(False, SYN | ACK)
        return [first, second, self._pkt(True, ACK)]

    def data(self, nbytes: int, *, from_client: bool = True) -> list[tuple[str, str, bytes]]:
        return [self._pkt(from_client, PSH | ACK, b"x" * nbytes), self._pkt(not from_client, ACK)]

    def close(self, *, reset: bool = False) -> list[tuple[str, str, bytes]]:
        if reset:
            return [self._pkt(True, RST | ACK)]
        return [self._pkt(True, FIN | ACK), self._pkt(False, FIN | ACK), self._pkt(True, ACK)]


@dataclass
class SyntheticHost:
    name: str
    vip: str
    argv: list[str]
    state: str = "starting"
    features: list[str] = field(default_factory=list)
    version: str | None = None
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0


class SyntheticManager:
    """Just enough of the manager for the relay: hosts, counters, observers, a switch."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.hosts = {name: SyntheticHost(name, vip, []) for name, vip in hosts.items()}
        self.observers: list[Any] = []

    def add_observer(self, observer: Any) -> None:
        self.observers.append(observer)

    def start_all(self) -> None:
        for h in self.hosts.values():
            h.argv = ["python", "-m", "norouter_trio", "agent", "--automated"]
            for o in self.observers:
                o.agent_starting(h.name, h.argv)
            h.state = "ready"
            h.features = ["tcp", "loopback", "dns"]
            h.version = "0.1.0"
            for o in self.observers:
                o.agent_configured(h.name, h.features, h.version)

    def exit(self, name: str, code: int, stderr: list[str]) -> None:
        self.hosts[name].state = "exited"
        for o in self.observers:
            o.agent_exited(name, code, stderr)

    def switch(self, src: str, dst: str, packet: bytes) -> None:
        """What the manager does per frame: count, then tell the observers."""
        s, d = self.hosts[src], self.hosts[dst]
        s.frames_in += 1  # the manager read it from src ...
        s.bytes_in += len(packet)
        d.frames_out += 1  # ... and wrote it to dst
        d.bytes_out += len(packet)
        for o in self.observers:
            o.frame_switched(src, dst, packet)

    def drop(self, src: str, reason: str, packet: bytes) -> None:
        h = self.hosts[src]
        h.drops[reason] = h.drops.get(reason, 0) + 1
        for o in self.observers:
            o.frame_dropped(src, reason, packet)


def conversations(manager: SyntheticManager, count: int) -> Iterator[TcpConversation]:
    """`count` conversations between successive pairs of the manager's hosts."""
    names = list(manager.hosts)
    for i in range(count):
        a, b = names[i % len(names)], names[(i + 1) % len(names)]
        yield TcpConversation(a, manager.hosts[a].vip, 40000 + i, b, manager.hosts[b].vip,
                              8080 + (i % 3))
