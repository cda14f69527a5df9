"""IPv4 and TCP wire formats: parse and build, with options.

`Segment` is the unit the sans-IO TCP connection consumes and produces; the stack adds and
strips the IPv4 header (addresses travel beside the segment, not inside it).
"""

from __future__ import annotations

from dataclasses import dataclass

# TCP header flags (RFC 9293 §3.1).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80


@dataclass(slots=True)
class Segment:
    """One TCP segment, addresses excluded.

    `window` is the 16-bit field exactly as on the wire (not yet scaled); the connection
    applies window scaling because only it knows whether scaling was negotiated.
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes | memoryview = b""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    ts_val: int | None = None
    ts_ecr: int | None = None
