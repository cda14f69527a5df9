"""Sans-IO TCP/IPv4 stack: turns L3 packets into work for `TCPConnection`s and back.

It owns the demultiplexing table (4-tuple → connection), the listeners, the SYNs waiting
for the bastion hook, the answers nobody else gives (RSTs for closed ports and unknown
connections, ICMP echo replies for the VIP) and the counters. It does no I/O and keeps no
clock: the trio layer (`netstack.py`) passes `now` in and moves the packets.

Lookup order for an incoming segment (documented because bastion mode depends on it):
1. an existing connection with that 4-tuple gets it, whatever its flags (the connection
   applies RFC 9293 / RFC 5961 checks: challenge ACKs for in-window SYN/RST);
2. a SYN waiting for the accept-any hook's decision absorbs retransmitted SYNs;
3. a lone SYN goes to the listener for (dst, port), else the wildcard (0.0.0.0, port), else
   to the accept-any hook if one is installed, else it is answered with RST — when it was
   for the VIP; a SYN for another address with no hook is not for us and is dropped;
4. anything else is answered per RFC 9293 §3.10.7.1 (RST unless it is a RST).
"""

from __future__ import annotations

import errno
import logging
import random
from dataclasses import dataclass, field
from socket import inet_aton
from typing import Any

from norouter_trio.tcp.checksum import combine, ones_sum
from norouter_trio.tcp.connection import TCPConfig, TCPConnection
from norouter_trio.tcp.packets import (
    ACK,
    FIN,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    RST,
    SYN,
    PacketError,
    Segment,
    address_sum,
    build_packet,
    icmp_echo_reply,
    parse_ipv4,
    parse_tcp,
    parse_tcp_fast,
)

log = logging.getLogger(__name__)

Address = tuple[str, int]
Key = tuple[str, int, str, int]  # local ip, local port, remote ip, remote port

WILDCARD = "0.0.0.0"
EPHEMERAL_LOW = 49152
EPHEMERAL_HIGH = 65535
MAX_PENDING_SYNS = 256  # SYNs waiting for the accept-any hook; more are dropped (counted)

COUNTER_NAMES = (
    "packets_in",
    "packets_out",
    "segments_in",
    "segments_out",
    "bytes_in",
    "bytes_out",
    "retransmits",
    "rst_out",
    "syn_refused",
    "icmp_echo_replies",
    "connections_opened",
    "connections_accepted",
    "connections_closed",
    "listen_overflow",
    "accept_any_offered",
    "syn_absorbed",
    "drop_bad_checksum",
    "drop_truncated",
    "drop_bad_header",
    "drop_bad_offset",
    "drop_bad_options",
    "drop_not_ipv4",
    "drop_fragment",
    "drop_not_tcp",
    "drop_not_for_us",
    "drop_syn_fin",
    "drop_rst_unknown",
    "drop_pending_overflow",
    "internal_errors",
)


@dataclass(eq=False, slots=True)
class Conn:
    """A connection as the stack knows it: the core plus its addresses.

    `owner` is free for the layer above (the trio layer keeps its stream state there).
    `delivered` is this connection's one `Delivered` outcome, returned for every segment
    it gets (an object per connection, not per packet).
    """

    key: Key
    tcp: TCPConnection
    local_b: bytes
    remote_b: bytes
    addr_sum: int
    owner: Any = None
    delivered: Delivered = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.delivered = Delivered(self)

    @property
    def local(self) -> Address:
        return self.key[0], self.key[1]

    @property
    def remote(self) -> Address:
        return self.key[2], self.key[3]


@dataclass(slots=True)
class PendingSyn:
    """A SYN offered to the accept-any hook and not yet accepted or refused."""

    key: Key
    syn: Segment
    received: float

    @property
    def local(self) -> Address:
        return self.key[0], self.key[1]

    @property
    def remote(self) -> Address:
        return self.key[2], self.key[3]


@dataclass(frozen=True, slots=True)
class Delivered:
    """The segment went to an existing connection (one shared instance per `Conn`)."""

    conn: Conn


@dataclass(slots=True)
class NewConnection:
    """A listener's SYN created a connection (SYN-RECEIVED; the SYN-ACK is in its output)."""

    conn: Conn
    listener: Address


@dataclass(slots=True)
class NewPending:
    """A SYN with no listener, for the accept-any hook to accept or refuse."""

    pending: PendingSyn


Outcome = Delivered | NewConnection | NewPending | None


def _packed(ip: str) -> bytes:
    try:
        return inet_aton(ip)
    except OSError:
        raise ValueError(f"{ip!r} is not an IPv4 address") from None


class TCPStack:
    """Demultiplexer and packet factory for every TCP connection of one agent."""

    def __init__(
        self,
        vip: str,
        *,
        config: TCPConfig | None = None,
        verify_checksums: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.vip = vip
        self.vip_b = _packed(vip)
        self.config = config if config is not None else TCPConfig()
        self.verify_checksums = verify_checksums
        self.accept_any = False
        self.connections: dict[Key, Conn] = {}
        self.listeners: set[Address] = set()
        self.pending: dict[Key, PendingSyn] = {}
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._rng = rng if rng is not None else random.Random()
        self._next_port = self._rng.randint(EPHEMERAL_LOW, EPHEMERAL_HIGH)
        self._ident = self._rng.getrandbits(16)
        self._output: list[bytes] = []

    # ---- listeners and active opens -------------------------------------------------

    def add_listener(self, ip: str, port: int) -> Address:
        """Listen on (ip, port); ip 0.0.0.0 matches any destination, port 0 picks one."""
        _packed(ip)
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range 0..65535")
        if port == 0:
            port = self._free_port(ip, None)
        address = (ip, port)
        if address in self.listeners:
            raise OSError(errno.EADDRINUSE, f"{ip}:{port} already has a listener in the stack")
        self.listeners.add(address)
        return address

    def remove_listener(self, address: Address) -> None:
        self.listeners.discard(address)

    def connect(self, ip: str, port: int, now: float, *, src_ip: str | None = None) -> Conn:
        """Active open from src_ip (default the VIP) and a free ephemeral port."""
        local_ip = src_ip or self.vip
        remote_b = _packed(ip)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range 1..65535 (connecting to {ip})")
        lport = self._free_port(local_ip, (ip, port))
        tcp = TCPConnection.connect((local_ip, lport), (ip, port), now, self.config)
        conn = self._register((local_ip, lport, ip, port), tcp, remote_b)
        self.counters["connections_opened"] += 1
        return conn

    def _free_port(self, local_ip: str, remote: Address | None) -> int:
        """Next ephemeral port not used by a listener or by this 4-tuple."""
        span = EPHEMERAL_HIGH - EPHEMERAL_LOW + 1
        port = self._next_port
        for _ in range(span):
            port = EPHEMERAL_LOW + (port - EPHEMERAL_LOW + 1) % span
            if (local_ip, port) in self.listeners or (WILDCARD, port) in self.listeners:
                continue
            if remote is None:
                if any(k[0] == local_ip and k[1] == port for k in self.connections):
                    continue
            elif (local_ip, port, remote[0], remote[1]) in self.connections:
                continue
            self._next_port = port
            return port
        raise OSError(
            errno.EADDRNOTAVAIL,
            f"no free ephemeral port on {local_ip} ({EPHEMERAL_LOW}-{EPHEMERAL_HIGH})",
        )

    def _register(self, key: Key, tcp: TCPConnection, remote_b: bytes | None = None) -> Conn:
        local_b = self.vip_b if key[0] == self.vip else inet_aton(key[0])
        if remote_b is None:
            remote_b = inet_aton(key[2])
        conn = Conn(key, tcp, local_b, remote_b, address_sum(local_b, remote_b))
        self.connections[key] = conn
        return conn

    def forget(self, conn: Conn) -> None:
        """Drop a CLOSED connection (or one the layer above declined) from the table, and
        break the reference cycles it is part of (its `Delivered` and the owner's state
        point back at it): it is then freed at once by reference counting. Left to the
        cycle collector, the connections ended since its last pass piled up, and every
        few hundred of them cost a pass of milliseconds, now and then a full one of tens
        of milliseconds, stalling whatever connection was in flight."""
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]
            self.counters["connections_closed"] += 1
        conn.owner = None
        if hasattr(conn, "delivered"):  # (forgotten twice: already gone)
            del conn.delivered  # nothing asks for it once the connection is off the table

    # ---- bastion hook ------------------------------------------------------------------

    def accept_pending(self, key: Key, now: float) -> Conn | None:
        """Accept a SYN offered to the hook; None when the peer gave up (sent RST)."""
        pending = self.pending.pop(key, None)
        if pending is None:
            return None
        tcp = TCPConnection.accept(pending.local, pending.remote, pending.syn, now, self.config)
        self.counters["connections_accepted"] += 1
        return self._register(key, tcp)

    def refuse_pending(self, key: Key) -> None:
        """Refuse a SYN offered to the hook: RST, as for a closed port."""
        pending = self.pending.pop(key, None)
        if pending is not None:
            self._reset_for(pending.key, pending.syn)
            self.counters["syn_refused"] += 1

    # ---- packets in ----------------------------------------------------------------------

    def receive_packet(self, packet: bytes | bytearray | memoryview, now: float) -> Outcome:
        """Handle one IPv4 packet; answers of the stack itself go to `take_output()`."""
        counters = self.counters
        counters["packets_in"] += 1
        fast = parse_tcp_fast(packet, self.verify_checksums)
        if fast is not None:
            src, dst, seg = fast
        else:
            try:
                ip = parse_ipv4(packet, verify_checksum=self.verify_checksums)
                if ip.protocol != IPPROTO_TCP:
                    if ip.protocol == IPPROTO_ICMP and ip.dst == self.vip:
                        reply = icmp_echo_reply(ip, self._next_ident())
                        if reply is not None:
                            counters["icmp_echo_replies"] += 1
                            self._emit(reply)
                            return None
                    raise PacketError("not_tcp", f"IP protocol {ip.protocol}")
                pseudo = None
                if self.verify_checksums:
                    pseudo = combine(ones_sum(ip.header[12:20]), IPPROTO_TCP + len(ip.payload))
                seg = parse_tcp(ip.payload, pseudo_sum=pseudo)
            except PacketError as exc:
                counters["drop_" + exc.reason] = counters.get("drop_" + exc.reason, 0) + 1
                log.debug("dropped packet: %s", exc)
                return None
            src, dst = ip.src, ip.dst
        counters["segments_in"] += 1
        counters["bytes_in"] += len(seg.payload)
        key = (dst, seg.dst_port, src, seg.src_port)
        conn = self.connections.get(key)
        if conn is not None:
            try:
                conn.tcp.receive_segment(seg, now)
            except Exception:
                # A bug in one connection must not take the whole agent down: log it,
                # reset that connection, keep serving the others.
                counters["internal_errors"] += 1
                log.exception(
                    "%s: error handling a segment for %s:%d <-> %s:%d; resetting", self.vip, *key
                )
                conn.tcp.abort(now)
            return conn.delivered
        return self._no_connection(seg, key, now)

    def _no_connection(self, seg: Segment, key: Key, now: float) -> Outcome:
        counters = self.counters
        flags = seg.flags
        dst, src = key[0], key[2]
        src_net = int(src[: src.index(".")])
        dst_net = int(dst[: dst.index(".")])
        if (
            src_net == 0 or src_net >= 224 or dst_net >= 224 or not seg.src_port or not seg.dst_port
        ):  # broadcast/multicast/unspecified: never answered
            counters["drop_not_for_us"] += 1
            return None
        pending = self.pending.get(key)
        if pending is not None:
            if flags & RST:
                del self.pending[key]  # the peer gave up; accept() will find it gone
            counters["syn_absorbed"] += 1
            return None
        if flags & RST:
            counters["drop_rst_unknown"] += 1
            return None
        if flags & (SYN | ACK) == SYN:
            if flags & FIN:
                counters["drop_syn_fin"] += 1
                return None
            listener: Address | None = (dst, seg.dst_port)
            if listener not in self.listeners:
                listener = (WILDCARD, seg.dst_port)
                if listener not in self.listeners:
                    listener = None
            if listener is not None:
                tcp = TCPConnection.accept(key[:2], key[2:], seg, now, self.config)
                conn = self._register(key, tcp)
                counters["connections_accepted"] += 1
                return NewConnection(conn, listener)
            if self.accept_any:
                if len(self.pending) >= MAX_PENDING_SYNS:
                    counters["drop_pending_overflow"] += 1
                    return None
                pending = PendingSyn(key, seg, now)
                self.pending[key] = pending
                counters["accept_any_offered"] += 1
                return NewPending(pending)
            if dst != self.vip:
                counters["drop_not_for_us"] += 1
                return None
            counters["syn_refused"] += 1
            self._reset_for(key, seg)
            return None
        if dst != self.vip and not self.accept_any:
            counters["drop_not_for_us"] += 1
            return None
        self._reset_for(key, seg)
        return None

    def _reset_for(self, key: Key, seg: Segment) -> None:
        """RFC 9293 §3.10.7.1: RST with seq=SEG.ACK, or RST+ACK acknowledging the segment."""
        if seg.flags & ACK:
            rst = Segment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
        else:
            length = (
                len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
            )
            rst = Segment(
                seg.dst_port, seg.src_port, 0, (seg.seq + length) & 0xFFFFFFFF, RST | ACK, 0
            )
        self.counters["rst_out"] += 1
        self.counters["segments_out"] += 1
        self._emit(build_packet(inet_aton(key[0]), inet_aton(key[2]), rst, self._next_ident()))

    # ---- packets out ---------------------------------------------------------------------

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def _emit(self, packet: bytes) -> None:
        self.counters["packets_out"] += 1
        self._output.append(packet)

    def take_output(self) -> list[bytes]:
        """Packets the stack itself produced (RSTs, echo replies) since the last call."""
        out = self._output
        if not out:
            return []
        self._output = []
        return out

    def output(self, conn: Conn, now: float) -> list[bytes]:
        """The connection's pending segments as IPv4 packets, from its address to its peer."""
        tcp = conn.tcp
        if tcp._quiet:  # unchanged since its last output: skip the call (about half of them)
            return []
        segments = tcp.segments_to_send(now)
        if not segments:
            return []
        counters = self.counters
        local_b, remote_b, addr_sum = conn.local_b, conn.remote_b, conn.addr_sum
        packets = []
        ident = self._ident
        for seg in segments:
            ident = (ident + 1) & 0xFFFF
            packets.append(build_packet(local_b, remote_b, seg, ident, 64, addr_sum))
            counters["bytes_out"] += len(seg.payload)
        self._ident = ident
        n = len(packets)
        counters["segments_out"] += n
        counters["packets_out"] += n
        return packets

    def connection_table(self) -> list[dict[str, Any]]:
        """One row per connection (addresses, state, buffered bytes) for the debug view."""
        return [
            {
                "local": f"{c.key[0]}:{c.key[1]}",
                "remote": f"{c.key[2]}:{c.key[3]}",
                "state": c.tcp.state.value,
                "send_buffered": c.tcp.bytes_in_send_buffer,
                "recv_buffered": c.tcp.readable_bytes,
            }
            for c in self.connections.values()
        ]

    def snapshot(self) -> dict[str, int]:
        """Counters plus gauges, for logs and the debug view."""
        snap = dict(self.counters)
        snap["connections"] = len(self.connections)
        snap["listeners"] = len(self.listeners)
        snap["pending_syns"] = len(self.pending)
        return snap
