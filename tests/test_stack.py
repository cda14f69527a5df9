"""The sans-IO stack: demultiplexing, listeners, RSTs, the bastion hook, garbage, floods."""

from __future__ import annotations

import random
import struct
from socket import inet_aton

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norouter_trio.tcp.checksum import checksum
from norouter_trio.tcp.connection import TCPConfig
from norouter_trio.tcp.packets import (
    ACK,
    FIN,
    IPPROTO_ICMP,
    PSH,
    RST,
    SYN,
    Segment,
    build_ipv4_header,
    build_packet,
    parse_ipv4,
    parse_packet,
    parse_tcp_fast,
)
from norouter_trio.tcp.stack import (
    EPHEMERAL_HIGH,
    EPHEMERAL_LOW,
    Conn,
    Delivered,
    NewConnection,
    NewPending,
    TCPStack,
)
from norouter_trio.tcp.state import TCPState

A, B = "127.0.42.101", "127.0.42.102"
PEER = "127.0.42.200"  # a host with no stack of its own: the test writes its packets


def pkt(src: str, dst: str, seg: Segment) -> bytes:
    return build_packet(inet_aton(src), inet_aton(dst), seg)


def syn(sport: int = 40000, dport: int = 80, seq: int = 1000, flags: int = SYN) -> Segment:
    return Segment(sport, dport, seq, 0, flags, 65535, mss=1460)


def only_output(stack: TCPStack) -> list[tuple[str, str, Segment]]:
    out = []
    for p in stack.take_output():
        ip, seg = parse_packet(p)
        out.append((ip.src, ip.dst, seg))
    return out


class Wire:
    """Two stacks and a synchronous wire: every packet out of one goes into the other."""

    def __init__(self, config: TCPConfig | None = None) -> None:
        self.a = TCPStack(A, config=config, rng=random.Random(1))
        self.b = TCPStack(B, config=config, rng=random.Random(2))
        self.now = 0.0
        self.events: list[object] = []

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for src, dst in ((self.a, self.b), (self.b, self.a)):
                packets = src.take_output()
                for conn in list(src.connections.values()):
                    packets += src.output(conn, self.now)
                for p in packets:
                    moved = True
                    outcome = dst.receive_packet(p, self.now)
                    if outcome is not None:
                        self.events.append(outcome)
            if not moved:
                return
        raise AssertionError("wire did not go quiet")

    def establish(self, port: int) -> tuple[Conn, Conn]:
        if (B, port) not in self.b.listeners:
            self.b.add_listener(B, port)
        client = self.a.connect(B, port, self.now)
        self.pump()
        server = self.b.connections[(B, port, A, client.key[1])]
        assert client.tcp.state is TCPState.ESTABLISHED
        assert server.tcp.state is TCPState.ESTABLISHED
        return client, server


def test_syn_to_closed_port_gets_rst_ack() -> None:
    stack = TCPStack(A)
    assert stack.receive_packet(pkt(PEER, A, syn(seq=5000)), 0.0) is None
    [(src, dst, rst)] = only_output(stack)
    assert (src, dst) == (A, PEER)
    assert rst.flags == RST | ACK and rst.seq == 0 and rst.ack == 5001
    assert (rst.src_port, rst.dst_port) == (80, 40000)
    assert stack.counters["syn_refused"] == 1 and stack.counters["rst_out"] == 1


def test_unknown_connection_answered_per_rfc9293() -> None:
    stack = TCPStack(A)
    stack.receive_packet(pkt(PEER, A, Segment(40000, 80, 7, 12345, ACK | PSH, 100, b"hey")), 0)
    [(_, _, rst)] = only_output(stack)
    assert rst.flags == RST and rst.seq == 12345  # seq = SEG.ACK, no ACK bit
    stack.receive_packet(pkt(PEER, A, Segment(40000, 80, 7, 0, FIN, 100, b"hey")), 0)
    [(_, _, rst)] = only_output(stack)
    assert rst.flags == RST | ACK and rst.ack == 7 + 3 + 1  # data and FIN acknowledged
    stack.receive_packet(pkt(PEER, A, Segment(40000, 80, 7, 0, RST, 0)), 0)
    assert only_output(stack) == []  # never answer a RST
    assert stack.counters["drop_rst_unknown"] == 1


def test_syn_for_another_address_without_hook_is_not_for_us() -> None:
    stack = TCPStack(A)
    stack.receive_packet(pkt(PEER, "198.18.0.5", syn()), 0)
    stack.receive_packet(pkt(PEER, "224.0.0.1", syn()), 0)
    assert only_output(stack) == []
    assert stack.counters["drop_not_for_us"] == 2


def test_listeners_demux_and_wildcard() -> None:
    stack = TCPStack(A)
    stack.add_listener(A, 80)
    stack.add_listener("0.0.0.0", 81)
    with pytest.raises(OSError, match="already has a listener"):
        stack.add_listener(A, 80)
    first = stack.receive_packet(pkt(PEER, A, syn(40000, 80)), 0)
    second = stack.receive_packet(pkt(PEER, A, syn(40001, 80)), 0)
    wild = stack.receive_packet(pkt(PEER, "198.18.0.9", syn(40000, 81)), 0)
    assert isinstance(first, NewConnection) and isinstance(second, NewConnection)
    assert first.listener == second.listener == (A, 80)
    assert first.conn is not second.conn and len(stack.connections) == 3
    assert isinstance(wild, NewConnection) and wild.listener == ("0.0.0.0", 81)
    # The SYN-ACK of the wildcard connection comes from the address the peer asked for.
    [p] = stack.output(wild.conn, 0)
    ip, synack = parse_packet(p)
    assert ip.src == "198.18.0.9" and synack.flags == SYN | ACK and synack.ack == 1001
    # A segment for the first connection reaches it and only it.
    [p] = stack.output(first.conn, 0)
    _, sa = parse_packet(p)
    ack = Segment(40000, 80, 1001, sa.seq + 1, ACK, 65535)
    outcome = stack.receive_packet(pkt(PEER, A, ack), 0)
    assert isinstance(outcome, Delivered) and outcome.conn is first.conn
    assert first.conn.tcp.state is TCPState.ESTABLISHED
    assert second.conn.tcp.state is TCPState.SYN_RECEIVED
    stack.remove_listener((A, 80))
    assert stack.receive_packet(pkt(PEER, A, syn(40002, 80)), 0) is None
    assert only_output(stack)[0][2].flags == RST | ACK


def test_accept_any_absorbs_retransmitted_syns_then_accepts_or_refuses() -> None:
    stack = TCPStack(A)
    stack.accept_any = True
    out = stack.receive_packet(pkt(PEER, "198.18.0.5", syn(40000, 22)), 0)
    assert isinstance(out, NewPending)
    assert out.pending.local == ("198.18.0.5", 22) and out.pending.remote == (PEER, 40000)
    assert stack.receive_packet(pkt(PEER, "198.18.0.5", syn(40000, 22)), 1) is None
    assert stack.counters["syn_absorbed"] == 1 and only_output(stack) == []
    conn = stack.accept_pending(out.pending.key, 2)
    assert conn is not None
    [p] = stack.output(conn, 2)
    ip, synack = parse_packet(p)
    assert (ip.src, ip.dst) == ("198.18.0.5", PEER) and synack.flags == SYN | ACK
    refused = stack.receive_packet(pkt(PEER, "198.18.0.6", syn(40001, 23, seq=9)), 3)
    assert isinstance(refused, NewPending)
    stack.refuse_pending(refused.pending.key)
    [(src, _, rst)] = only_output(stack)
    assert src == "198.18.0.6" and rst.flags == RST | ACK and rst.ack == 10
    # A peer that gives up (RST) withdraws its SYN.
    gone = stack.receive_packet(pkt(PEER, A, syn(40002, 9)), 4)
    assert isinstance(gone, NewPending)
    stack.receive_packet(pkt(PEER, A, Segment(40002, 9, 1001, 0, RST, 0)), 5)
    assert stack.accept_pending(gone.pending.key, 6) is None


def _fix_ip(p: bytes) -> bytes:
    from norouter_trio.tcp.checksum import checksum

    head = p[:10] + b"\x00\x00" + p[12:20]
    return head[:10] + struct.pack("!H", checksum(head)) + p[12:]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p[:10], "drop_truncated"),
        (lambda p: p[:30], "drop_truncated"),
        (lambda p: p[:-1] + bytes((p[-1] ^ 1,)), "drop_bad_checksum"),
        (lambda p: b"\x60" + p[1:], "drop_not_ipv4"),
        (lambda p: _fix_ip(p[:6] + b"\x20\x00" + p[8:]), "drop_fragment"),
        (lambda p: _fix_ip(p[:6] + b"\x00\x08" + p[8:]), "drop_fragment"),
    ],
)
def test_garbage_counted_and_harmless(mutate: object, reason: str) -> None:
    stack = TCPStack(A)
    stack.add_listener(A, 80)
    good = pkt(PEER, A, syn())
    assert callable(mutate)
    assert stack.receive_packet(mutate(good), 0) is None
    assert stack.counters[reason] == 1
    assert stack.connections == {} and only_output(stack) == []


def _raw_tcp(header: bytes, src: str = PEER, dst: str = A) -> bytes:
    """An IPv4 packet around raw TCP bytes with a correct TCP checksum."""
    from norouter_trio.tcp.checksum import checksum

    pseudo = inet_aton(src) + inet_aton(dst) + struct.pack("!BBH", 0, 6, len(header))
    ck = checksum(pseudo + header)
    header = header[:16] + struct.pack("!H", ck) + header[18:]
    return build_ipv4_header(inet_aton(src), inet_aton(dst), 6, len(header)) + header


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x40, SYN, 100, 0, 0), "drop_bad_offset"),
        (
            struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0xF0, SYN, 100, 0, 0) + bytes(8),
            "drop_bad_offset",
        ),
        (
            struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x60, SYN, 100, 0, 0) + b"\x02\x04\x05",
            "drop_bad_offset",
        ),  # the options the offset promises are cut
        (
            struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x60, SYN, 100, 0, 0) + b"\x01\x08\x0a\x00",
            "drop_bad_options",
        ),
        (
            struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x60, SYN, 100, 0, 0) + b"\x03\x00\x00\x00",
            "drop_bad_options",
        ),
        (struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x50, SYN | FIN, 100, 0, 0), "drop_syn_fin"),
    ],
    ids=["offset<5", "offset>len", "options-cut", "option-past-header", "option-len-0", "syn+fin"],
)
def test_bad_tcp_headers_counted(raw: bytes, reason: str) -> None:
    stack = TCPStack(A)
    stack.add_listener(A, 80)
    assert stack.receive_packet(_raw_tcp(raw), 0) is None
    assert stack.counters[reason] == 1, stack.counters
    assert stack.connections == {} and only_output(stack) == []


def test_checksum_verification_off_accepts_corrupt_packets() -> None:
    stack = TCPStack(A, verify_checksums=False)
    stack.add_listener(A, 80)
    good = pkt(PEER, A, syn())
    corrupt = good[:-1] + bytes((good[-1] ^ 1,))
    assert isinstance(stack.receive_packet(corrupt, 0), NewConnection)


def test_non_tcp_dropped_and_icmp_echo_answered() -> None:
    stack = TCPStack(A)
    udp = build_ipv4_header(inet_aton(PEER), inet_aton(A), 17, 8) + bytes(8)
    assert stack.receive_packet(udp, 0) is None
    assert stack.counters["drop_not_tcp"] == 1
    from norouter_trio.tcp.checksum import checksum

    body = b"\x00\x00\x00\x07\x00\x01abc"
    echo = b"\x08\x00" + struct.pack("!H", checksum(b"\x08\x00" + body)) + body[2:]
    stack.receive_packet(
        build_ipv4_header(inet_aton(PEER), inet_aton(A), IPPROTO_ICMP, len(echo)) + echo, 0
    )
    [reply] = stack.take_output()
    ip = parse_ipv4(reply)
    assert (ip.src, ip.dst, ip.payload[0]) == (A, PEER, 0)
    assert stack.counters["icmp_echo_replies"] == 1


def test_ephemeral_ports_in_range_and_distinct() -> None:
    stack = TCPStack(A, rng=random.Random(7))
    ports = {stack.connect(B, 80, 0).key[1] for _ in range(200)}
    assert len(ports) == 200
    assert all(EPHEMERAL_LOW <= p <= EPHEMERAL_HIGH for p in ports)
    # A port in use for this 4-tuple is skipped even when the counter comes back to it.
    stack._next_port = min(ports) - 1
    assert stack.connect(B, 80, 0).key[1] not in ports


def test_data_flows_end_to_end_and_counters() -> None:
    wire = Wire()
    client, server = wire.establish(80)
    client.tcp.send(b"ping" * 1000, wire.now)
    wire.pump()
    assert server.tcp.read(100000, wire.now) == b"ping" * 1000
    assert wire.a.counters["bytes_out"] == 4000 and wire.b.counters["bytes_in"] == 4000
    assert wire.b.counters["segments_in"] >= 2 and wire.a.counters["segments_out"] >= 2
    snap = wire.b.snapshot()
    assert snap["connections"] == 1 and snap["listeners"] == 1
    [row] = wire.b.connection_table()
    assert row["local"] == f"{B}:80" and row["state"] == "ESTABLISHED"


def test_syn_fin_and_rst_floods_do_not_hurt_connections() -> None:
    """RFC 5961: blind RSTs/SYNs with wrong sequence numbers are dropped or challenge-ACKed;
    the attacked connection and its neighbour keep working."""
    wire = Wire()
    victim_client, victim = wire.establish(80)
    other_client, other = wire.establish(80)
    rng = random.Random(3)
    _, _, rip, rport = victim.key
    for i in range(300):
        seq = rng.getrandbits(32)
        if abs((seq - victim.tcp.rcv_nxt) & 0xFFFFFFFF) < 1 << 22:
            continue  # keep it clearly out of window
        flags = (RST, SYN | FIN, SYN, RST | ACK)[i % 4]
        seg = Segment(rport, 80, seq, rng.getrandbits(32), flags, 1000)
        wire.b.receive_packet(pkt(rip, B, seg), wire.now)
    challenge_acks = sum(len(wire.b.output(c, wire.now)) for c in (victim, other))
    assert challenge_acks <= TCPConfig().challenge_ack_limit  # rate limited
    assert victim.tcp.state is TCPState.ESTABLISHED
    assert other.tcp.state is TCPState.ESTABLISHED
    # Floods at closed ports and unknown connections cost RSTs at most, never a crash.
    for i in range(100):
        seg = Segment(41000 + i, 9, rng.getrandbits(32), 0, (RST, SYN | FIN)[i % 2], 0)
        wire.b.receive_packet(pkt(PEER, B, seg), wire.now)
    assert len(wire.b.take_output()) == 0  # RSTs unanswered, SYN+FIN dropped
    wire.pump()
    victim_client.tcp.send(b"still alive", wire.now)
    other_client.tcp.send(b"me too", wire.now)
    wire.pump()
    assert victim.tcp.read(100, wire.now) == b"still alive"
    assert other.tcp.read(100, wire.now) == b"me too"


u32 = st.integers(0, 2**32 - 1)


@settings(max_examples=150, deadline=None)
@given(
    segs=st.lists(
        st.tuples(
            u32,  # seq offset from what the connection expects (mostly near it)
            u32,  # ack
            st.integers(0, 255),  # flags
            st.integers(0, 65535),  # window
            st.binary(max_size=64),
            st.booleans(),  # near rcv_nxt / snd_una or anywhere
        ),
        min_size=1,
        max_size=8,
    )
)
def test_random_segments_on_an_established_connection_never_crash(
    segs: list[tuple[int, int, int, int, bytes, bool]],
) -> None:
    """Whatever arrives for a live 4-tuple, the stack and core neither raise nor stop
    answering; a neighbouring connection is untouched."""
    wire = Wire()
    _client, server = wire.establish(80)
    other_client, other = wire.establish(80)
    _, _, rip, rport = server.key
    for seq, ack, flags, window, payload, near in segs:
        if near:
            seq = (server.tcp.rcv_nxt + seq % 4096 - 2048) & 0xFFFFFFFF
            ack = (server.tcp.snd_una + ack % 4096 - 2048) & 0xFFFFFFFF
        seg = Segment(rport, 80, seq, ack, flags, window, payload)
        wire.b.receive_packet(pkt(rip, B, seg), wire.now)
        wire.now += 0.01
        for conn in list(wire.b.connections.values()):
            conn.tcp.handle_timer(wire.now)
            wire.b.output(conn, wire.now)
    assert wire.b.counters["internal_errors"] == 0
    assert other.tcp.state is TCPState.ESTABLISHED
    other_client.tcp.send(b"fine", wire.now)
    wire.pump()
    assert other.tcp.read(10, wire.now) == b"fine"


def _with_ip_options(packet: bytes) -> bytes:
    """The same packet with a 4-byte IPv4 option (NOPs) inserted and the header redone."""
    _, tos, total, ident, frag, ttl, proto, _, src, dst = struct.unpack_from(
        "!BBHHHBBH4s4s", packet
    )
    head = struct.pack("!BBHHHBBH4s4s", 0x46, tos, total + 4, ident, frag, ttl, proto, 0, src, dst)
    head += b"\x01\x01\x01\x00"
    ck = checksum(head)
    return head[:10] + struct.pack("!H", ck) + head[12:] + packet[20:]


def test_uncommon_layouts_reach_the_connection_through_the_general_parser() -> None:
    """Packets the fast parser declines (IP options, SACK blocks, an MSS on a data
    segment) are parsed by the general code and delivered all the same."""
    wire = Wire()
    client, server = wire.establish(80)
    c, s = client.tcp, server.tcp
    port, nxt, ack = client.key[1], c.snd_nxt, c.rcv_nxt
    segs = [
        Segment(port, 80, nxt, ack, ACK | PSH, 1000, b"one"),
        Segment(port, 80, (nxt + 3) & 0xFFFFFFFF, ack, ACK, 1000, b"two", mss=1000),
        Segment(port, 80, (nxt + 6) & 0xFFFFFFFF, ack, ACK, 1000, b"3", sack_blocks=((1, 2),)),
    ]
    packets = [_with_ip_options(pkt(A, B, segs[0]))] + [pkt(A, B, x) for x in segs[1:]]
    for p in packets:
        assert parse_tcp_fast(p) is None  # the premise: the general parser's work
        assert isinstance(wire.b.receive_packet(p, wire.now), Delivered)
    assert s.read(100, wire.now) == b"onetwo3"
    assert wire.b.counters["segments_in"] >= 3
    assert not any(k.startswith("drop_") and v for k, v in wire.b.counters.items())
