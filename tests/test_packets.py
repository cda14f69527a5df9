"""IPv4/TCP parse and build: round trips, correct checksums, and garbage that only ever
raises `PacketError`."""

from __future__ import annotations

import contextlib
import struct
from socket import inet_aton

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norouter_trio.tcp.checksum import rfc1071_reference
from norouter_trio.tcp.packets import (
    ACK,
    FIN,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    PSH,
    SYN,
    PacketError,
    Segment,
    build_ipv4_header,
    build_packet,
    build_tcp,
    icmp_echo_reply,
    parse_ipv4,
    parse_packet,
    parse_tcp_fast,
)

SRC, DST = inet_aton("127.0.42.101"), inet_aton("127.0.42.102")
u32 = st.integers(0, 2**32 - 1)

segments = st.builds(
    Segment,
    src_port=st.integers(1, 65535),
    dst_port=st.integers(1, 65535),
    seq=u32,
    ack=u32,
    flags=st.integers(0, 255),
    window=st.integers(0, 65535),
    payload=st.binary(max_size=3000),
    mss=st.none() | st.integers(0, 65535),
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    sack_blocks=st.lists(st.tuples(u32, u32), max_size=4).map(tuple),
    ts_val=st.none() | u32,
    ts_ecr=u32,
)


def _expected_sack(seg: Segment) -> tuple[tuple[int, int], ...]:
    used = (
        (4 if seg.mss is not None else 0)
        + (12 if seg.ts_val is not None else 0)
        + (4 if seg.sack_permitted and seg.ts_val is None else 0)
        + (4 if seg.wscale is not None else 0)
    )
    return seg.sack_blocks[: max(0, (40 - used - 4) // 8)]


@settings(max_examples=150, deadline=None)
@given(
    seg=segments,
    ident=st.integers(0, 65535),
    addrs=st.tuples(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4)),
)
def test_round_trip_and_checksums(seg: Segment, ident: int, addrs: tuple[bytes, bytes]) -> None:
    src, dst = addrs
    pkt = build_packet(src, dst, seg, ident=ident)
    assert rfc1071_reference(pkt[:20]) == 0
    tcp = pkt[20:]
    pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_TCP, len(tcp))
    assert rfc1071_reference(pseudo + tcp) == 0
    pkt = build_packet(SRC, DST, seg, ident=7)
    # Checksums checked with the slow RFC 1071 loop, independently of the fast path.
    assert rfc1071_reference(pkt[:20]) == 0
    tcp = pkt[20:]
    pseudo = SRC + DST + struct.pack("!BBH", 0, IPPROTO_TCP, len(tcp))
    assert rfc1071_reference(pseudo + tcp) == 0
    ip, got = parse_packet(pkt)
    assert (ip.src, ip.dst, ip.protocol, ip.ident) == ("127.0.42.101", "127.0.42.102", 6, 7)
    assert (got.src_port, got.dst_port, got.seq, got.ack, got.flags, got.window) == (
        seg.src_port,
        seg.dst_port,
        seg.seq,
        seg.ack,
        seg.flags,
        seg.window,
    )
    assert bytes(got.payload) == seg.payload
    assert got.mss == seg.mss and got.wscale == seg.wscale
    assert got.sack_permitted == seg.sack_permitted
    assert got.sack_blocks == _expected_sack(seg)
    assert got.ts_val == seg.ts_val
    assert got.ts_ecr == (seg.ts_ecr if seg.ts_val is not None else None)


def _valid() -> bytes:
    return build_packet(
        SRC, DST, Segment(40000, 80, 1, 2, ACK | PSH, 1000, b"hello!!", ts_val=5, ts_ecr=6)
    )


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=120))
def test_random_bytes_only_raise_packet_error(data: bytes) -> None:
    for verify in (True, False):
        with contextlib.suppress(PacketError):
            parse_packet(data, verify_checksums=verify)


@settings(max_examples=200, deadline=None)
@given(
    cut=st.integers(0, 80), pos=st.integers(0, 80), byte=st.integers(0, 255), verify=st.booleans()
)
def test_mutated_packets_only_raise_packet_error(
    cut: int, pos: int, byte: int, verify: bool
) -> None:
    pkt = bytearray(_valid())
    pkt[pos % len(pkt)] = byte
    for candidate in (bytes(pkt), bytes(pkt[:cut])):
        with contextlib.suppress(PacketError):
            parse_packet(candidate, verify_checksums=verify)


def _with_tcp_header(raw_tcp: bytes) -> bytes:
    return build_ipv4_header(SRC, DST, IPPROTO_TCP, len(raw_tcp)) + raw_tcp


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "truncated"),
        (b"\x45" + bytes(10), "truncated"),
        (b"\x65" + bytes(19), "not_ipv4"),
        (b"\x44" + bytes(19), "bad_header"),
        (_valid()[:30], "truncated"),  # IP total length says more than arrived
        (_with_tcp_header(bytes(10)), "truncated"),  # TCP header cut
        (_with_tcp_header(struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x40, 0, 0, 0, 0)), "bad_offset"),
        (_with_tcp_header(struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0xF0, 0, 0, 0, 0)), "bad_offset"),
        # option length runs past the header / option with no length byte / zero length
        (
            _with_tcp_header(
                struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x60, 0, 0, 0, 0) + b"\x08\x0a\x00\x00"
            ),
            "bad_options",
        ),
        (
            _with_tcp_header(
                struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x60, 0, 0, 0, 0) + b"\x01\x01\x01\x02"
            ),
            "bad_options",
        ),
        (
            _with_tcp_header(
                struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x60, 0, 0, 0, 0) + b"\x1e\x00\x00\x00"
            ),
            "bad_options",
        ),
        (
            _with_tcp_header(
                struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x60, 0, 0, 0, 0) + b"\x02\x03\x00\x00"
            ),
            "bad_options",
        ),
    ],
)
def test_garbage_reasons(packet: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        parse_packet(packet, verify_checksums=False)
    assert info.value.reason == reason


def test_checksum_verification_can_be_switched_off() -> None:
    pkt = bytearray(_valid())
    pkt[-1] ^= 0xFF  # payload corrupted: TCP checksum wrong
    with pytest.raises(PacketError) as info:
        parse_packet(bytes(pkt))
    assert info.value.reason == "bad_checksum"
    _, seg = parse_packet(bytes(pkt), verify_checksums=False)
    assert seg.payload[-1] == ord("!") ^ 0xFF
    pkt = bytearray(_valid())
    pkt[8] = 1  # TTL changed without fixing the IP header checksum
    with pytest.raises(PacketError) as info:
        parse_packet(bytes(pkt))
    assert info.value.reason == "bad_checksum"


def test_fragments_and_other_protocols_refused() -> None:
    pkt = bytearray(_valid())
    pkt[6] = 0x20  # MF
    with pytest.raises(PacketError) as info:
        parse_packet(bytes(pkt), verify_checksums=False)
    assert info.value.reason == "fragment"
    udp = build_ipv4_header(SRC, DST, 17, 8) + bytes(8)
    with pytest.raises(PacketError) as info:
        parse_packet(udp)
    assert info.value.reason == "not_tcp"


def test_ip_options_and_padding_skipped() -> None:
    pkt = _valid()
    tcp = pkt[20:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + len(tcp), 0, 0x4000, 64, 6, 0, SRC, DST)
    hdr += b"\x01\x01\x01\x00"
    ck = rfc1071_reference(hdr)
    hdr = hdr[:10] + struct.pack("!H", ck) + hdr[12:]
    _ip, seg = parse_packet(hdr + tcp + b"\x00\x00 link padding")
    assert seg.payload == b"hello!!" and seg.flags == ACK | PSH and seg.ts_val == 5


def test_syn_options_layout_fits() -> None:
    seg = Segment(
        1, 2, 3, 0, SYN, 65535, mss=65495, wscale=7, sack_permitted=True, ts_val=1, ts_ecr=0
    )
    pkt = build_packet(SRC, DST, seg)
    assert (pkt[32] >> 4) * 4 == 40  # 20 header + 20 options, 4-byte aligned
    _, got = parse_packet(pkt)
    assert (got.mss, got.wscale, got.sack_permitted, got.ts_val) == (65495, 7, True, 1)
    assert parse_packet(build_packet(SRC, DST, Segment(1, 2, 3, 4, FIN | ACK, 9)))[1].payload == b""


def test_icmp_echo_reply() -> None:
    body = b"\x00\x00\x12\x34\x00\x01" + b"ping-data"
    ck = rfc1071_reference(b"\x08\x00" + body)
    echo = b"\x08\x00" + struct.pack("!H", ck) + body[2:]
    req = parse_ipv4(build_ipv4_header(DST, SRC, IPPROTO_ICMP, len(echo)) + echo)
    reply = icmp_echo_reply(req)
    assert reply is not None
    ip = parse_ipv4(reply)
    assert (ip.src, ip.dst, ip.protocol) == ("127.0.42.101", "127.0.42.102", IPPROTO_ICMP)
    assert ip.payload[0] == 0 and ip.payload[4:] == echo[4:]
    assert rfc1071_reference(ip.payload) == 0
    assert icmp_echo_reply(parse_ipv4(reply)) is None  # a reply is not answered


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(min_size=12, max_size=80), offset=st.integers(0, 15))
def test_random_tcp_headers_only_raise_packet_error(raw: bytes, offset: int) -> None:
    raw = raw[:12] + bytes((offset << 4,)) + raw[13:]
    try:
        _, seg = parse_packet(_with_tcp_header(raw), verify_checksums=False)
    except PacketError:
        return
    assert len(seg.payload) == len(raw) - offset * 4


# The layouts `build_packet` and `parse_tcp_fast` handle on their fast paths: no options,
# only timestamps, or a SYN's four; payloads on both sides of the inline-checksum size,
# odd and even.
plain_segments = st.builds(
    Segment,
    src_port=st.integers(0, 65535),
    dst_port=st.integers(0, 65535),
    seq=u32,
    ack=u32,
    flags=st.integers(0, 255),
    window=st.integers(0, 65535),
    payload=st.binary(max_size=1500),
    ts_val=st.none() | u32,
    ts_ecr=u32,
) | st.builds(  # a SYN with all four options, in the Linux layout
    Segment,
    src_port=st.integers(0, 65535),
    dst_port=st.integers(0, 65535),
    seq=u32,
    ack=u32,
    flags=st.integers(0, 255),
    window=st.integers(0, 65535),
    payload=st.binary(max_size=100),
    mss=st.integers(0, 65535),
    wscale=st.integers(0, 255),
    sack_permitted=st.just(True),
    ts_val=u32,
    ts_ecr=u32,
)


@settings(max_examples=150, deadline=None)
@given(seg=plain_segments, ident=st.integers(0, 65535), ttl=st.integers(1, 255))
def test_fast_build_is_byte_identical_to_the_general_encoding(
    seg: Segment, ident: int, ttl: int
) -> None:
    head, payload = build_tcp(SRC, DST, seg)
    tcp = head + bytes(payload)
    general = build_ipv4_header(SRC, DST, IPPROTO_TCP, len(tcp), ident, ttl) + tcp
    assert build_packet(SRC, DST, seg, ident, ttl) == general
    assert rfc1071_reference(general[:20]) == 0
    pseudo = SRC + DST + struct.pack("!BBH", 0, IPPROTO_TCP, len(tcp))
    assert rfc1071_reference(pseudo + tcp) == 0


@settings(max_examples=200, deadline=None)
@given(
    seg=plain_segments,
    pos=st.integers(0, 1600),
    byte=st.integers(0, 255),
    cut=st.integers(0, 1600),
    verify=st.booleans(),
)
def test_fast_parse_agrees_with_the_general_parse(
    seg: Segment, pos: int, byte: int, cut: int, verify: bool
) -> None:
    """parse_tcp_fast accepts only what parse_packet accepts, with the same result; it
    declines (None) anything else, including every corruption the checksums catch."""
    good = build_packet(SRC, DST, seg, 9)
    mutated = bytearray(good)
    mutated[pos % len(good)] ^= byte
    for pkt in (good, bytes(mutated), good[:cut], memoryview(good + b"pad")):
        fast = parse_tcp_fast(pkt, verify)
        try:
            ip, slow = parse_packet(pkt, verify_checksums=verify)
        except PacketError:
            assert fast is None
            continue
        if fast is not None:
            assert fast == (ip.src, ip.dst, slow)
    assert parse_tcp_fast(good, verify) is not None
