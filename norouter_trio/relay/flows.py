"""TCP flows seen by the switch, and the sampled packet log.

Both are fed from the switch's hot path (`RelayObserver.frame_switched`), so each update is a
few dict/deque operations on fields read straight from the IPv4/TCP headers; addresses stay
as raw 4-byte keys and are only formatted when the relay builds a message.
"""

from __future__ import annotations

import socket
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

_FLAG_LETTERS = ((SYN, "S"), (ACK, "A"), (FIN, "F"), (RST, "R"), (PSH, "P"), (URG, "U"))


def flag_text(flags: int) -> str:
    """tcpdump-like flag letters, e.g. "SA" for SYN-ACK."""
    return "".join(letter for bit, letter in _FLAG_LETTERS if flags & bit) or "."


def ip_text(raw: bytes) -> str:
    return socket.inet_ntoa(raw) if len(raw) == 4 else "?"


@dataclass(slots=True)
class Flow:
    """One TCP connection, oriented client → server when its SYN was seen.

    `key` is the 12 raw bytes src address, dst address, src port, dst port (as in the
    headers), so the hot path builds it with two slices and never formats anything.
    """

    key: bytes
    rev: bytes
    src_host: str
    dst_host: str
    first: float
    last: float
    state: str = "open"  # "syn", "established", "fin", "closed", "reset" or "open" (mid-stream)
    bytes_fwd: int = 0  # payload bytes src → dst
    bytes_rev: int = 0
    packets: int = 0
    fin_fwd: bool = False
    fin_rev: bool = False

    def to_json(self, now: float) -> dict[str, Any]:
        k = self.key
        return {
            "src": ip_text(k[0:4]),
            "sport": int.from_bytes(k[8:10], "big"),
            "dst": ip_text(k[4:8]),
            "dport": int.from_bytes(k[10:12], "big"),
            "src_host": self.src_host,
            "dst_host": self.dst_host,
            "state": self.state,
            "bytes_out": self.bytes_fwd,
            "bytes_in": self.bytes_rev,
            "packets": self.packets,
            "age": round(now - self.first, 3),
            "idle": round(now - self.last, 3),
        }


_DONE = ("closed", "reset")


class FlowTable:
    """The most recently active TCP flows, at most `limit` (least recently active evicted).

    `index` maps both directions' keys to (flow, is_forward) so that every packet costs one
    lookup; `order` keeps the flows in least-recently-active order for eviction.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.index: dict[bytes, tuple[Flow, bool]] = {}
        self.order: OrderedDict[bytes, Flow] = OrderedDict()
        self.evicted = 0

    @property
    def flows(self) -> OrderedDict[bytes, Flow]:
        return self.order

    def update(
        self, now: float, src_host: str, dst_host: str, packet: bytes, ihl: int, flags: int,
        payload_len: int,
    ) -> None:
        """Account one IPv4/TCP packet (`ihl` = IPv4 header length, header known complete)."""
        key = packet[12:20] + packet[ihl : ihl + 4]
        hit = self.index.get(key)
        if hit is None or (flags & 0x12 == SYN and hit[0].state in _DONE):
            flow = self._new(now, src_host, dst_host, key, flags)
            forward = True
        else:
            flow, forward = hit
            self.order.move_to_end(flow.key)
        flow.last = now
        flow.packets += 1
        if forward:
            flow.bytes_fwd += payload_len
        else:
            flow.bytes_rev += payload_len
        if flags & 0x07:  # SYN, FIN or RST: the only packets that change the state
            self._control(flow, forward, flags)

    def _new(self, now: float, src_host: str, dst_host: str, key: bytes, flags: int) -> Flow:
        """A new connection (or a port reused after close), oriented by this packet."""
        rev = key[4:8] + key[0:4] + key[10:12] + key[8:10]
        old = self.index.get(key)
        if old is not None:
            self._forget(old[0])
        flow = Flow(key, rev, src_host, dst_host, now, now)
        if flags & 0x12 == SYN:
            flow.state = "syn"
        self.index[key] = (flow, True)
        self.index[rev] = (flow, False)
        self.order[key] = flow
        if len(self.order) > self.limit:
            _, oldest = self.order.popitem(last=False)
            self._forget(oldest)
            self.evicted += 1
        return flow

    def _forget(self, flow: Flow) -> None:
        self.index.pop(flow.key, None)
        self.index.pop(flow.rev, None)
        self.order.pop(flow.key, None)

    @staticmethod
    def _control(flow: Flow, forward: bool, flags: int) -> None:
        if flags & RST:
            flow.state = "reset"
        elif flags & FIN:
            if forward:
                flow.fin_fwd = True
            else:
                flow.fin_rev = True
            flow.state = "closed" if flow.fin_fwd and flow.fin_rev else "fin"
        elif flow.state == "syn" and not forward and flags & (SYN | ACK) == SYN | ACK:
            flow.state = "established"

    def to_json(self, now: float, limit: int | None = None) -> list[dict[str, Any]]:
        """The flows, most recently active first."""
        out: list[dict[str, Any]] = []
        for flow in reversed(self.order.values()):
            if limit is not None and len(out) >= limit:
                break
            out.append(flow.to_json(now))
        return out


class PacketLog:
    """A rate-limited, sampled log of packets for the page.

    At most `rate` entries per second, counted in windows of `window` seconds. Control
    packets (SYN, FIN, RST) and drops may use a whole window's quota, data packets only half
    of it, so a bulk transfer cannot crowd the handshakes out of the log. What is not logged
    is counted.
    """

    def __init__(self, rate: float = 100.0, window: float = 0.5, keep: int = 500) -> None:
        self.window = window
        self.quota = max(2, round(rate * window))
        self.data_quota = self.quota // 2
        self.window_end = 0.0
        self.used = 0
        self.pending: list[dict[str, Any]] = []
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.not_logged = 0

    def admit(self, now: float, control: bool) -> bool:
        if now >= self.window_end:
            self.window_end = now + self.window
            self.used = 0
        used = self.used
        if used < (self.quota if control else self.data_quota):
            self.used = used + 1
            return True
        self.not_logged += 1
        return False

    def add(self, entry: dict[str, Any]) -> None:
        self.pending.append(entry)
        self.recent.append(entry)

    def take_pending(self) -> list[dict[str, Any]]:
        pending, self.pending = self.pending, []
        return pending


def describe(
    now: float, src_host: str, dst_host: str, packet: bytes, drop: str | None = None
) -> dict[str, Any]:
    """A packet-log entry: time, hosts, addresses, ports, flags, length (and drop reason)."""
    entry: dict[str, Any] = {"t": round(now, 6), "src_host": src_host, "dst_host": dst_host}
    entry["len"] = len(packet)
    if drop is not None:
        entry["drop"] = drop
    if len(packet) < 20 or packet[0] >> 4 != 4:
        entry["proto"] = "?"
        return entry
    ihl = (packet[0] & 0x0F) * 4
    entry["src"] = ip_text(packet[12:16])
    entry["dst"] = ip_text(packet[16:20])
    proto = packet[9]
    if proto == 6 and len(packet) >= ihl + 14:
        entry["proto"] = "tcp"
        entry["sport"] = int.from_bytes(packet[ihl : ihl + 2], "big")
        entry["dport"] = int.from_bytes(packet[ihl + 2 : ihl + 4], "big")
        entry["flags"] = flag_text(packet[ihl + 13])
        entry["seq"] = int.from_bytes(packet[ihl + 4 : ihl + 8], "big")
        entry["payload"] = max(0, len(packet) - ihl - (packet[ihl + 12] >> 4) * 4)
    else:
        entry["proto"] = {1: "icmp", 17: "udp"}.get(proto, str(proto))
    return entry
