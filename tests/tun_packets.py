"""A tiny IPv4/TCP builder and parser for the TUN bridge and its tests.

Deliberately independent of `norouter_trio.tcp.packets`: the bridge is tested against the
kernel alone, and the conformance tests use it to read traces without trusting the code
under test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_FLAG_NAMES = ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (ACK, "."))


def checksum(data: bytes) -> int:
    """RFC 1071 internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def sums_to_zero(data: bytes | memoryview) -> bool:
    """True when `data`, checksum field included, has a valid internet checksum.

    Fast for 64 KiB packets: since 2**16 == 1 (mod 0xFFFF), the one's-complement sum of the
    16-bit words is congruent to the whole buffer read as one big integer, mod 0xFFFF.
    """
    n = int.from_bytes(data, "big") << (8 if len(data) % 2 else 0)
    return n != 0 and n % 0xFFFF == 0


def problem(packet: bytes) -> str | None:
    """What is wrong with an IPv4/TCP packet our stack emitted, or None if it is sound."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return "not IPv4"
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or total != len(packet):
        return f"IPv4 header length {ihl} / total length {total} for {len(packet)} bytes"
    if not sums_to_zero(packet[:ihl]):
        return "bad IPv4 header checksum"
    if packet[8] == 0:
        return "TTL 0"
    if packet[9] != 6:
        return None
    if total < ihl + 20 or (packet[ihl + 12] >> 4) * 4 < 20 or \
            ihl + (packet[ihl + 12] >> 4) * 4 > total:
        return "bad TCP data offset"
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, total - ihl)
    if not sums_to_zero(pseudo + packet[ihl:]):
        return "bad TCP checksum"
    return None


def _addr(ip: str) -> bytes:
    return bytes(int(part) for part in ip.split("."))


def build_tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
              *, window: int = 65535, payload: bytes = b"", mss: int | None = None) -> bytes:
    """One IPv4 packet carrying one TCP segment, checksums filled in."""
    options = struct.pack("!BBH", 2, 4, mss) if mss is not None else b""
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window, 0, 0)
    tcp += options + payload
    pseudo = _addr(src) + _addr(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     _addr(src), _addr(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp


@dataclass(frozen=True)
class TCPInfo:
    """The fields of an IPv4/TCP packet that traces and assertions look at."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload_len: int
    checksum_ok: bool | None  # None: not checked (header-only parse)
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False

    def flag_str(self) -> str:
        return "".join(name for bit, name in _FLAG_NAMES if self.flags & bit) or "-"

    def summary(self) -> str:
        opts = "".join([f" mss={self.mss}" if self.mss is not None else "",
                        f" ws={self.wscale}" if self.wscale is not None else "",
                        " sackOK" if self.sack_permitted else ""])
        return (f"{self.src}:{self.sport} > {self.dst}:{self.dport} [{self.flag_str()}] "
                f"seq={self.seq} ack={self.ack} win={self.window} len={self.payload_len}{opts}"
                + (" BAD-CHECKSUM" if self.checksum_ok is False else ""))


def parse_tcp(packet: bytes, *, verify: bool = False) -> TCPInfo | None:
    """Parse an IPv4/TCP packet; None for anything else.

    Without `verify` only the headers are needed (a trace keeps just those), so the packet
    may be cut after the TCP header; with it both checksums are checked.
    """
    if len(packet) < 40 or packet[0] >> 4 != 4 or packet[9] != 6:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or total < ihl + 20 or len(packet) < ihl + 20:
        return None
    src = ".".join(str(b) for b in packet[12:16])
    dst = ".".join(str(b) for b in packet[16:20])
    sport, dport, seq, ack, off, flags, window = struct.unpack_from("!HHIIBBH", packet, ihl)
    mss, wscale, sack_ok = _options(packet[ihl + 20:ihl + (off >> 4) * 4])
    ok: bool | None = None
    if verify:
        tcp = packet[ihl:total]
        pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
        ok = total <= len(packet) and checksum(packet[:ihl]) == 0 \
            and checksum(pseudo + tcp) == 0
    return TCPInfo(src, dst, sport, dport, seq, ack, flags, window,
                   payload_len=max(0, total - ihl - (off >> 4) * 4), checksum_ok=ok,
                   mss=mss, wscale=wscale, sack_permitted=sack_ok)


def _options(opts: bytes) -> tuple[int | None, int | None, bool]:
    """MSS, window scale and SACK-permitted from raw TCP options (RFC 9293, 7323, 2018)."""
    mss = wscale = None
    sack_ok = False
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        length = opts[i + 1]
        body = opts[i + 2:i + length]
        if kind == 2 and len(body) == 2:
            mss = struct.unpack("!H", body)[0]
        elif kind == 3 and len(body) == 1:
            wscale = body[0]
        elif kind == 4:
            sack_ok = True
        i += length
    return mss, wscale, sack_ok


def describe(packet: bytes, *, verify: bool = False) -> str:
    """One line for a trace: the TCP summary, or the IP version/protocol and length."""
    info = parse_tcp(packet, verify=verify)
    if info is not None:
        return info.summary()
    if packet and packet[0] >> 4 == 4 and len(packet) >= 20:
        return f"IPv4 proto={packet[9]} len={struct.unpack_from('!H', packet, 2)[0]}"
    return f"non-IPv4 len={len(packet)}"
