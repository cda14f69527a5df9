"""Recent packets per host, and the pcap file the page downloads.

The rings live on the switch's hot path, so appending is O(1) and bounded both in count and in
bytes: the relay never holds more than `max_bytes` of captured data per host whatever the
traffic. Packets are stored truncated to `snaplen` (like tcpdump's snap length); the pcap
record keeps the original length so readers show the truncation.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable

# Raw IP: each record starts with the IPv4 header, no link-layer header. LINKTYPE_RAW (101)
# is read by every libpcap and by Wireshark; LINKTYPE_IPV4 (228) is newer and less common.
LINKTYPE_RAW = 101
PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
_GLOBAL_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")


#: One captured packet: (wall-clock time, src host, dst host, original length, stored bytes).
#: A plain tuple because it is built for every switched frame.
Captured = tuple[float, str, str, int, bytes]


class PacketRing:
    """The most recent packets one host sent.

    Bounded in count; each entry is cut to the snap length, so the stored bytes are bounded
    by `max_packets * snaplen` (the observer sizes `max_packets` from its byte budget).
    """

    def __init__(self, max_packets: int = 2000) -> None:
        self.packets: deque[Captured] = deque(maxlen=max_packets)
        self.append = self.packets.append

    @property
    def stored_bytes(self) -> int:
        return sum(len(p[4]) for p in self.packets)


def header_length(packet: bytes) -> int:
    """IPv4 header plus TCP header length (just the IPv4 header for other protocols)."""
    if len(packet) < 20:
        return len(packet)
    ihl = (packet[0] & 0x0F) * 4
    if packet[9] == 6 and len(packet) >= ihl + 13:
        return min(len(packet), ihl + (packet[ihl + 12] >> 4) * 4)
    return min(len(packet), ihl)


def pcap_bytes(packets: Iterable[Captured], *, payload: bool = True, snaplen: int = 65535) -> bytes:
    """A complete pcap file (raw IPv4 link type) holding `packets` in the given order.

    With `payload=False` each record is cut after the TCP header so that a capture can be
    shared without the application data.
    """
    out = [_GLOBAL_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_RAW)]
    for when, _src, _dst, orig_len, stored in packets:
        data = stored if payload else stored[: header_length(stored)]
        seconds = int(when)
        micros = min(999_999, round((when - seconds) * 1_000_000))
        out.append(_RECORD_HEADER.pack(seconds, micros, len(data), max(orig_len, len(data))))
        out.append(data)
    return b"".join(out)


def merged(rings: Iterable[PacketRing], host: str | None = None) -> list[Captured]:
    """Packets of all rings in time order; with `host`, only those it sent or received."""
    items = [
        p
        for ring in rings
        for p in ring.packets
        if host is None or p[1] == host or p[2] == host
    ]
    items.sort(key=lambda p: p[0])
    return items
