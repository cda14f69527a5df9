"""IPv4 and TCP wire formats: parse and build, with options.

`Segment` is the unit the sans-IO TCP connection consumes and produces; the stack adds and
strips the IPv4 header (addresses travel beside the segment, not inside it).

Every packet of every connection passes here, so the common shapes have fast paths:
`build_packet` packs the IPv4 and TCP headers in one `struct` call and computes both
checksums from the field values, and `parse_tcp_fast` reads both headers with one unpack;
they cover no options, timestamps only, and a SYN's MSS + SACK-permitted + timestamps +
window scale (the layouts Linux and we send). Anything else takes the general code, which
the fast paths must agree with exactly (tests/test_packets.py checks it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from socket import inet_aton, inet_ntoa

from norouter_trio.tcp.checksum import checksum, combine, ones_sum

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


IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPV4_HEADER_LEN = 20
TCP_HEADER_LEN = 20
MAX_TCP_OPTIONS = 40
MAX_IPV4_PAYLOAD = 65535 - IPV4_HEADER_LEN

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_OPT_MSS = struct.Struct("!BBH")
_OPT_TS = struct.Struct("!BBBBII")
_OPT_WS = struct.Struct("!BBBB")
_SACK_BLOCK = struct.Struct("!II")
_SACKOK_TS_PREFIX = (4, 2)  # SACK-permitted fills the two bytes before a timestamp option
_NOP_NOP = (1, 1)
# Whole IPv4 + TCP headers in one pack/unpack: (version/IHL, TOS) as one word, the data
# offset and flags as one word; `_HDR_TS` adds NOP NOP TS (RFC 7323 Appendix A layout).
_HDR_PLAIN = struct.Struct("!HHHHBBH4s4sHHIIHHHH")
_HDR_TS = struct.Struct("!HHHHBBH4s4sHHIIHHHHIII")
# For parsing: the fields `parse_tcp_fast` uses, addresses as integers; TOS, ident, TTL and
# both checksums are skipped ("x"), the checksums being verified over the raw bytes.
_HDR_IN = struct.Struct("!BxHxxHxBxxIIHHIIBBHxxxx")
_NOP_NOP_TS_WORD = 0x0101080A
_NOP_NOP_TS = b"\x01\x01\x08\x0a"
_TS_VALUES = struct.Struct("!II")
# A SYN's options as Linux (and `encode_options`) lay them out: MSS, SACK-permitted with
# timestamps, NOP + window scale (20 bytes).
_HDR_SYN = struct.Struct("!HHHHBBH4s4sHHIIHHHHHHIIIHBB")
_SYN_OPTS = struct.Struct("!xxHxxxxIIxxxB")  # MSS, TS value, TS echo, window shift
_MSS_KIND = 0x0204
_SACKOK_TS_WORD = 0x0402080A
_NOP_WS_WORD = 0x0103
_SACKOK_TS = b"\x04\x02\x08\x0a"
_NOP_WS = b"\x01\x03\x03"
# Up to this many bytes a checksum is one `int.from_bytes` reduced with `%`, inline; longer
# buffers go to `ones_sum` (folding, or numpy), which is cheaper per byte.
_SMALL = 512
_IP_DF = 0x4000
_IP_MF = 0x2000
_IP_OFFSET_MASK = 0x1FFF

Buffer = bytes | bytearray | memoryview


class PacketError(ValueError):
    """A packet we cannot use; `reason` is the drop-counter key (e.g. "truncated")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(slots=True)
class IPv4Packet:
    """An IPv4 header's useful fields; `payload` (a view into the packet) excludes IP
    options and link padding."""

    src: str
    dst: str
    protocol: int
    ttl: int
    ident: int
    header: bytes
    payload: memoryview


def parse_ipv4(packet: Buffer, *, verify_checksum: bool = True) -> IPv4Packet:
    """Parse an IPv4 packet; options are skipped, fragments refused (we never fragment).

    Raises only `PacketError` (reasons: truncated, not_ipv4, bad_header, bad_checksum,
    fragment).
    """
    n = len(packet)
    if n < IPV4_HEADER_LEN:
        raise PacketError("truncated", f"IPv4 packet of {n} bytes is shorter than a header")
    vihl = packet[0]
    if vihl >> 4 != 4:
        raise PacketError("not_ipv4", f"IP version {vihl >> 4}")
    hlen = (vihl & 0x0F) * 4
    if hlen < IPV4_HEADER_LEN:
        raise PacketError("bad_header", f"IPv4 header length {hlen} < 20")
    total = (packet[2] << 8) | packet[3]
    if total < hlen:
        raise PacketError("bad_header", f"IPv4 total length {total} < header length {hlen}")
    if total > n:
        raise PacketError("truncated", f"IPv4 total length {total} > {n} bytes received")
    header = bytes(packet[:hlen])
    if verify_checksum and ones_sum(header) != 0xFFFF:
        raise PacketError("bad_checksum", "IPv4 header checksum")
    _, _, _, ident, frag, ttl, proto, _, src, dst = _IPV4.unpack_from(header)
    if frag & (_IP_MF | _IP_OFFSET_MASK):
        raise PacketError("fragment", f"IPv4 fragment (flags/offset 0x{frag:04x})")
    return IPv4Packet(
        inet_ntoa(src),
        inet_ntoa(dst),
        proto,
        ttl,
        ident,
        header,
        memoryview(packet)[hlen:total],  # no copy: parse_tcp copies the payload once
    )


def build_ipv4_header(
    src: bytes, dst: bytes, protocol: int, payload_len: int, ident: int = 0, ttl: int = 64
) -> bytes:
    """A 20-byte IPv4 header (DF set, so `ident` may be anything; RFC 6864)."""
    total = IPV4_HEADER_LEN + payload_len
    hdr = _IPV4.pack(0x45, 0, total, ident & 0xFFFF, _IP_DF, ttl, protocol, 0, src, dst)
    return _IPV4.pack(
        0x45, 0, total, ident & 0xFFFF, _IP_DF, ttl, protocol, checksum(hdr), src, dst
    )


def encode_options(seg: Segment) -> bytes:
    """TCP options in Linux's order, padded to 4 bytes; SACK blocks are cut to fit 40."""
    if (
        seg.mss is None
        and seg.ts_val is None
        and seg.wscale is None
        and not seg.sack_permitted
        and not seg.sack_blocks
    ):
        return b""
    parts: list[bytes] = []
    if seg.mss is not None:
        parts.append(_OPT_MSS.pack(2, 4, seg.mss & 0xFFFF))
    if seg.ts_val is not None:
        a, b = _SACKOK_TS_PREFIX if seg.sack_permitted else _NOP_NOP
        parts.append(
            _OPT_TS.pack(a, b, 8, 10, seg.ts_val & 0xFFFFFFFF, (seg.ts_ecr or 0) & 0xFFFFFFFF)
        )
    elif seg.sack_permitted:
        parts.append(b"\x01\x01\x04\x02")
    if seg.wscale is not None:
        parts.append(_OPT_WS.pack(1, 3, 3, seg.wscale))
    if seg.sack_blocks:
        room = MAX_TCP_OPTIONS - sum(len(p) for p in parts)
        count = min(len(seg.sack_blocks), (room - 4) // 8)
        if count > 0:
            blocks = seg.sack_blocks[:count]
            parts.append(
                bytes((1, 1, 5, 2 + 8 * count))
                + b"".join(
                    _SACK_BLOCK.pack(left & 0xFFFFFFFF, right & 0xFFFFFFFF)
                    for left, right in blocks
                )
            )
    return b"".join(parts)


def _parse_options(data: Buffer, start: int, end: int, seg: Segment) -> None:
    i = start
    while i < end:
        kind = data[i]
        if kind == 0:
            return
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            raise PacketError("bad_options", f"TCP option {kind} has no length byte")
        length = data[i + 1]
        if length < 2 or i + length > end:
            raise PacketError(
                "bad_options", f"TCP option {kind} length {length} runs past the header"
            )
        if kind == 2:
            if length != 4:
                raise PacketError("bad_options", f"MSS option length {length}")
            seg.mss = (data[i + 2] << 8) | data[i + 3]
        elif kind == 3:
            if length != 3:
                raise PacketError("bad_options", f"window scale option length {length}")
            seg.wscale = data[i + 2]
        elif kind == 4:
            if length != 2:
                raise PacketError("bad_options", f"SACK-permitted option length {length}")
            seg.sack_permitted = True
        elif kind == 5:
            if (length - 2) % 8 or length == 2:
                raise PacketError("bad_options", f"SACK option length {length}")
            seg.sack_blocks = tuple(
                _SACK_BLOCK.unpack_from(data, j) for j in range(i + 2, i + length, 8)
            )
        elif kind == 8:
            if length != 10:
                raise PacketError("bad_options", f"timestamp option length {length}")
            seg.ts_val, seg.ts_ecr = _SACK_BLOCK.unpack_from(data, i + 2)
        i += length


def pseudo_header_sum(src: bytes, dst: bytes, tcp_length: int) -> int:
    """Partial sum of the TCP pseudo-header (RFC 9293 §3.1) for `combine`."""
    return combine(ones_sum(src + dst), IPPROTO_TCP + tcp_length)


def parse_tcp(data: Buffer, *, pseudo_sum: int | None = None) -> Segment:
    """Parse a TCP segment; verify its checksum when `pseudo_sum` is given.

    Raises only `PacketError` (reasons: truncated, bad_offset, bad_options, bad_checksum).
    """
    n = len(data)
    if n < TCP_HEADER_LEN:
        raise PacketError("truncated", f"TCP segment of {n} bytes is shorter than a header")
    sport, dport, seq, ack, off, flags, window, _, _ = _TCP.unpack_from(data)
    hlen = (off >> 4) * 4
    if hlen < TCP_HEADER_LEN or hlen > n:
        raise PacketError("bad_offset", f"TCP data offset {hlen} bytes in a {n}-byte segment")
    if pseudo_sum is not None and combine(pseudo_sum, ones_sum(data)) != 0xFFFF:
        raise PacketError("bad_checksum", f"TCP checksum (port {sport} -> {dport})")
    seg = Segment(sport, dport, seq, ack, flags, window, bytes(data[hlen:]) if n > hlen else b"")
    if hlen > TCP_HEADER_LEN:
        _parse_options(data, TCP_HEADER_LEN, hlen, seg)
    return seg


def address_sum(src: bytes, dst: bytes) -> int:
    """Unfolded sum of the four 16-bit words of two packed IPv4 addresses.

    Both the IPv4 header checksum and the TCP pseudo-header include it, so a connection
    computes it once and passes it to `build_packet`.
    """
    a = int.from_bytes(src, "big")
    b = int.from_bytes(dst, "big")
    return (a >> 16) + (a & 0xFFFF) + (b >> 16) + (b & 0xFFFF)


def build_tcp(
    src: bytes, dst: bytes, seg: Segment, addr_sum: int | None = None
) -> tuple[bytes, bytes | memoryview]:
    """TCP header (with checksum) and the payload, to be joined behind an IPv4 header.

    The payload is summed once here and never copied until the final join.
    """
    opts = encode_options(seg)
    hlen = TCP_HEADER_LEN + len(opts)
    payload = seg.payload
    tcp_len = hlen + len(payload)
    fields = (
        seg.src_port,
        seg.dst_port,
        seg.seq & 0xFFFFFFFF,
        seg.ack & 0xFFFFFFFF,
        (hlen >> 2) << 4,
        seg.flags & 0xFF,
        seg.window & 0xFFFF,
    )
    head = _TCP.pack(*fields, 0, 0)
    if addr_sum is None:
        addr_sum = address_sum(src, dst)
    # Never 0: the protocol number is in it. r == 0 means the sum is 0xFFFF (RFC 1071).
    r = (ones_sum(head + opts if opts else head) + addr_sum + IPPROTO_TCP + tcp_len) % 0xFFFF
    if payload:
        r = (r + ones_sum(payload)) % 0xFFFF
    return _TCP.pack(*fields, ~r & 0xFFFF if r else 0, 0) + opts, payload


def build_packet(
    src: bytes,
    dst: bytes,
    seg: Segment,
    ident: int = 0,
    ttl: int = 64,
    addr_sum: int | None = None,
) -> bytes:
    """A whole IPv4 packet carrying `seg`; addresses are 4-byte packed (`inet_aton`).

    Pass `addr_sum` (from `address_sum`) to skip re-summing the addresses. Segments with
    no options or only timestamps (nearly all after the handshake) take a fast path: both
    checksums are summed from the field values (a 32-bit word is ≡ its two halves' sum
    modulo 0xFFFF) and the 40- or 52-byte header is packed once.
    """
    if addr_sum is None:
        addr_sum = address_sum(src, dst)
    if seg.sack_blocks:
        pass  # the general path below cuts the blocks to fit
    elif seg.mss is not None:
        if seg.wscale is not None and seg.sack_permitted and seg.ts_val is not None:
            return _build_syn(src, dst, seg, ident & 0xFFFF, ttl, addr_sum)
    elif seg.wscale is None and not seg.sack_permitted:
        payload = seg.payload
        plen = len(payload)
        ts_val = seg.ts_val
        hlen = 20 if ts_val is None else 32
        tcp_len = hlen + plen
        if tcp_len <= MAX_IPV4_PAYLOAD:
            total = IPV4_HEADER_LEN + tcp_len
            ident &= 0xFFFF
            r = (0x4500 + total + ident + _IP_DF + ((ttl << 8) | IPPROTO_TCP) + addr_sum) % 0xFFFF
            ip_ck = ~r & 0xFFFF if r else 0
            sport = seg.src_port
            dport = seg.dst_port
            seq = seg.seq & 0xFFFFFFFF
            ack = seg.ack & 0xFFFFFFFF
            offflags = (hlen << 10) | (seg.flags & 0xFF)
            window = seg.window & 0xFFFF
            # Never 0 before reduction: the protocol number is in it; r == 0 means the
            # sum is 0xFFFF (RFC 1071), whose complement is 0.
            s = sport + dport + seq + ack + offflags + window + addr_sum + IPPROTO_TCP + tcp_len
            if plen:
                if plen <= _SMALL:
                    s += int.from_bytes(payload, "big") << (8 * (plen & 1))
                else:
                    s += ones_sum(payload)
            if ts_val is None:
                r = s % 0xFFFF
                head = _HDR_PLAIN.pack(
                    0x4500, total, ident, _IP_DF, ttl, IPPROTO_TCP, ip_ck, src, dst,
                    sport, dport, seq, ack, offflags, window, ~r & 0xFFFF if r else 0, 0,
                )  # fmt: skip
            else:
                ts_val &= 0xFFFFFFFF
                ts_ecr = (seg.ts_ecr or 0) & 0xFFFFFFFF
                r = (s + _NOP_NOP_TS_WORD + ts_val + ts_ecr) % 0xFFFF
                head = _HDR_TS.pack(
                    0x4500, total, ident, _IP_DF, ttl, IPPROTO_TCP, ip_ck, src, dst,
                    sport, dport, seq, ack, offflags, window, ~r & 0xFFFF if r else 0, 0,
                    _NOP_NOP_TS_WORD, ts_val, ts_ecr,
                )  # fmt: skip
            return head + payload if plen else head
    head, payload = build_tcp(src, dst, seg, addr_sum)
    tcp_len = len(head) + len(payload)
    if tcp_len > MAX_IPV4_PAYLOAD:
        raise ValueError(
            f"TCP segment of {tcp_len} bytes (port "
            f"{seg.src_port} -> {seg.dst_port}) does not fit one IPv4 packet"
        )
    total = IPV4_HEADER_LEN + tcp_len
    ident &= 0xFFFF
    # The header's words summed arithmetically: no second pack, no byte-level pass.
    r = (0x4500 + total + ident + _IP_DF + ((ttl << 8) | IPPROTO_TCP) + addr_sum) % 0xFFFF
    ip = _IPV4.pack(
        0x45, 0, total, ident, _IP_DF, ttl, IPPROTO_TCP, ~r & 0xFFFF if r else 0, src, dst
    )
    return b"".join((ip, head, payload))


def _build_syn(src: bytes, dst: bytes, seg: Segment, ident: int, ttl: int, addr_sum: int) -> bytes:
    """`build_packet` for a SYN or SYN-ACK with all four options, in the Linux layout."""
    payload = seg.payload
    plen = len(payload)
    tcp_len = 40 + plen
    if tcp_len > MAX_IPV4_PAYLOAD:
        raise ValueError(
            f"TCP segment of {tcp_len} bytes (port "
            f"{seg.src_port} -> {seg.dst_port}) does not fit one IPv4 packet"
        )
    total = IPV4_HEADER_LEN + tcp_len
    r = (0x4500 + total + ident + _IP_DF + ((ttl << 8) | IPPROTO_TCP) + addr_sum) % 0xFFFF
    ip_ck = ~r & 0xFFFF if r else 0
    sport = seg.src_port
    dport = seg.dst_port
    seq = seg.seq & 0xFFFFFFFF
    ack = seg.ack & 0xFFFFFFFF
    offflags = (40 << 10) | (seg.flags & 0xFF)
    window = seg.window & 0xFFFF
    mss = (seg.mss or 0) & 0xFFFF
    ts_val = (seg.ts_val or 0) & 0xFFFFFFFF
    ts_ecr = (seg.ts_ecr or 0) & 0xFFFFFFFF
    wscale = seg.wscale or 0  # not masked: like `encode_options`, >255 is an error
    s = (
        sport + dport + seq + ack + offflags + window + addr_sum + IPPROTO_TCP + tcp_len
        + _MSS_KIND + mss + _SACKOK_TS_WORD + ts_val + ts_ecr + _NOP_WS_WORD + 0x0300 + wscale
    )  # fmt: skip
    if plen:
        s += ones_sum(payload)
    r = s % 0xFFFF
    head = _HDR_SYN.pack(
        0x4500, total, ident, _IP_DF, ttl, IPPROTO_TCP, ip_ck, src, dst,
        sport, dport, seq, ack, offflags, window, ~r & 0xFFFF if r else 0, 0,
        _MSS_KIND, mss, _SACKOK_TS_WORD, ts_val, ts_ecr, _NOP_WS_WORD, 3, wscale,
    )  # fmt: skip
    return head + payload if plen else head


def parse_packet(packet: Buffer, *, verify_checksums: bool = True) -> tuple[IPv4Packet, Segment]:
    """Parse an IPv4+TCP packet; non-TCP raises `PacketError("not_tcp")`."""
    ip = parse_ipv4(packet, verify_checksum=verify_checksums)
    if ip.protocol != IPPROTO_TCP:
        raise PacketError("not_tcp", f"IP protocol {ip.protocol}")
    pseudo = None
    if verify_checksums:
        pseudo = combine(ones_sum(ip.header[12:20]), IPPROTO_TCP + len(ip.payload))
    return ip, parse_tcp(ip.payload, pseudo_sum=pseudo)


_ADDR_CACHE: dict[int, str] = {}
_ADDR_CACHE_MAX = 1024  # an agent talks to a handful of virtual IPs; bound it anyway


def _addr_str(a: int) -> str:
    """Dotted quad of a 32-bit address, from a small cache (saves `inet_ntoa` per packet)."""
    s = _ADDR_CACHE.get(a)
    if s is None:
        if len(_ADDR_CACHE) >= _ADDR_CACHE_MAX:
            _ADDR_CACHE.clear()
        s = _ADDR_CACHE[a] = inet_ntoa(a.to_bytes(4, "big"))
    return s


def parse_tcp_fast(
    packet: Buffer, verify_checksums: bool = True
) -> tuple[str, str, Segment] | None:
    """(src, dst, segment) of a plain IPv4+TCP packet, or None for anything else.

    "Plain": no IP options, not a fragment, TCP options absent, NOP NOP TS, or a SYN's
    four in the Linux layout; checksums right (when verified). One unpack reads both
    headers and the IPv4 checksum is summed from the fields. None means "not decided
    here": call `parse_ipv4` / `parse_tcp`, which accept or refuse it with the exact
    reason; so this never accepts what they would refuse, nor parses it differently. The
    layout is checked before the checksums so a declined packet is summed only once.
    """
    n = len(packet)
    if n < 40:
        return None
    (
        vihl, total, frag, proto, src, dst, sport, dport, seq, ack, off, flags, window
    ) = _HDR_IN.unpack_from(packet)  # fmt: skip
    hlen = (off & 0xF0) >> 2
    tcp_len = total - 20
    if (
        vihl != 0x45
        or proto != IPPROTO_TCP
        or frag & (_IP_MF | _IP_OFFSET_MASK)
        or total > n
        or hlen < 20
        or hlen > tcp_len
    ):
        return None
    # (total >= 40 follows: hlen >= 20 and hlen <= total - 20.)
    if hlen == 32:
        if packet[40:44] != _NOP_NOP_TS:
            return None
    elif hlen == 40:
        if (
            packet[40] != 2
            or packet[41] != 4
            or packet[44:48] != _SACKOK_TS
            or packet[56:59] != _NOP_WS
        ):
            return None
    elif hlen != 20:
        return None
    if verify_checksums:
        # IPv4 header: the sum of its words must be 0xFFFF, i.e. the header's value ≡ 0
        # (mod 0xFFFF, as 2**16 ≡ 1); it is never 0, since its first byte is 0x45.
        if int.from_bytes(packet[:20], "big") % 0xFFFF:
            return None
        if tcp_len <= _SMALL:
            # Big-endian words ≡ the buffer's value mod 0xFFFF; an odd tail is padded.
            s = int.from_bytes(packet[20:total], "big") << (8 * (tcp_len & 1))
        else:
            s = ones_sum(memoryview(packet)[20:total])
        if (s + src + dst + IPPROTO_TCP + tcp_len) % 0xFFFF:
            return None
    start = 20 + hlen
    payload = bytes(packet[start:total]) if total > start else b""
    if hlen == 32:
        ts_val, ts_ecr = _TS_VALUES.unpack_from(packet, 44)
        seg = Segment(
            sport, dport, seq, ack, flags, window, payload, None, None, False, (), ts_val, ts_ecr
        )
    elif hlen == 20:
        seg = Segment(sport, dport, seq, ack, flags, window, payload)
    else:
        mss, ts_val, ts_ecr, wscale = _SYN_OPTS.unpack_from(packet, 40)
        seg = Segment(
            sport, dport, seq, ack, flags, window, payload, mss, wscale, True, (), ts_val, ts_ecr
        )
    # The address cache inline: two calls fewer per packet when both are known.
    cache = _ADDR_CACHE
    return cache.get(src) or _addr_str(src), cache.get(dst) or _addr_str(dst), seg


def icmp_echo_reply(ip: IPv4Packet, ident: int = 0) -> bytes | None:
    """The echo reply for an ICMP echo request (so `ping VIP` works), else None."""
    msg = ip.payload
    if ip.protocol != IPPROTO_ICMP or len(msg) < 8 or msg[0] != 8 or msg[1] != 0:
        return None
    if ones_sum(msg) != 0xFFFF:
        return None
    body = b"\x00\x00\x00\x00" + msg[4:]
    ck = checksum(body)
    reply = bytes((0, 0, ck >> 8, ck & 0xFF)) + msg[4:]
    src, dst = inet_aton(ip.dst), inet_aton(ip.src)
    return build_ipv4_header(src, dst, IPPROTO_ICMP, len(reply), ident) + reply
