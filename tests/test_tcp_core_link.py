"""Two sans-IO connections over a lossy in-memory link, driven by hypothesis.

Every byte must arrive exactly once and in order, both ways, and both ends must reach
CLOSED normally, with drops, duplicates, reordering, odd segment sizes and ISNs that make
sequence numbers wrap past 2**32.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tcplink import A_ADDR, B_ADDR, Link, LinkFaults, Peer, connected_pair

import norouter_trio.tcp.connection as connection_module
from norouter_trio.tcp.connection import TCPConfig, TCPConnection
from norouter_trio.tcp.events import CloseReason, ConnectionClosed, ConnectionReset
from norouter_trio.tcp.packets import ACK, RST, SYN, Segment
from norouter_trio.tcp.state import TCPState

near_wrap = st.integers(min_value=2**32 - 200_000, max_value=2**32 - 1)


def _finish(link) -> None:  # type: ignore[no-untyped-def]
    link.run(
        lambda: link.a.closed is not None and link.b.closed is not None,
        max_steps=100_000,
        max_time=2000.0,
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    a_len=st.integers(0, 300_000),
    b_len=st.integers(0, 60_000),
    isn_a=near_wrap,
    isn_b=near_wrap,
    mss=st.sampled_from([200, 536, 1460, 9000, 65495]),
    drop=st.sampled_from([0.0, 0.02, 0.1, 0.25]),
    dup=st.sampled_from([0.0, 0.05, 0.2]),
    reorder=st.sampled_from([0.0, 0.1, 0.3]),
    chunk=st.integers(1, 70_000),
    sack=st.booleans(),
    timestamps=st.booleans(),
    nodelay=st.booleans(),
    recv_buffer=st.sampled_from([3000, 65535, 2 * 1024 * 1024]),
    seed=st.integers(0, 2**32),
)
def test_lossy_link_delivers_every_byte_once_in_order(
    a_len: int,
    b_len: int,
    isn_a: int,
    isn_b: int,
    mss: int,
    drop: float,
    dup: float,
    reorder: float,
    chunk: int,
    sack: bool,
    timestamps: bool,
    nodelay: bool,
    recv_buffer: int,
    seed: int,
) -> None:
    rng = random.Random(seed)
    a_data = rng.randbytes(a_len)
    b_data = rng.randbytes(b_len)
    cfg = TCPConfig(
        mss=mss,
        sack=sack,
        timestamps=timestamps,
        recv_buffer=recv_buffer,
        max_retries=40,
        syn_retries=40,
        max_rto=2.0,
    )
    link = connected_pair(
        a_data,
        b_data,
        config_a=cfg,
        config_b=cfg,
        isn_a=isn_a,
        isn_b=isn_b,
        faults=LinkFaults(drop=drop, dup=dup, reorder=reorder, delay=0.002, jitter=0.003),
        rng=rng,
    )
    link.a.chunk = chunk
    link.b.chunk = max(1, chunk // 3)
    assert link.a.conn is not None
    link.a.conn.set_nodelay(nodelay)
    _finish(link)
    assert bytes(link.b.received) == a_data
    assert bytes(link.a.received) == b_data
    assert link.a.closed == ConnectionClosed(CloseReason.NORMAL)
    assert link.b.closed == ConnectionClosed(CloseReason.NORMAL)
    assert link.b.conn is not None and link.b.conn.state is TCPState.CLOSED
    # The scoreboard every connection shares until its first SACK stays empty.
    assert connection_module._NO_SACK.ranges == []


def test_clean_link_bulk_both_ways_wraps_sequence_space() -> None:
    rng = random.Random(7)
    a_data = rng.randbytes(3_000_000)
    b_data = rng.randbytes(1_000_000)
    link = connected_pair(a_data, b_data, isn_a=2**32 - 10, isn_b=2**32 - 70_000)
    _finish(link)
    assert bytes(link.b.received) == a_data and bytes(link.a.received) == b_data
    assert link.a.closed == link.b.closed == ConnectionClosed(CloseReason.NORMAL)


def test_slow_reader_zero_window_then_reopen_over_link() -> None:
    rng = random.Random(3)
    data = rng.randbytes(500_000)
    link = connected_pair(data, config_b=TCPConfig(recv_buffer=8192))
    link.b.read_enabled = False
    link.run(lambda: link.a.conn is not None and link.a.conn.snd_wnd == 0, max_steps=10_000)
    start = link.now
    link.run(lambda: link.now > start + 5.0, max_steps=10_000)  # probes, no progress
    assert link.b.conn is not None and link.b.conn.readable_bytes == 8192
    assert link.a.conn.state in (TCPState.FIN_WAIT_1, TCPState.CLOSING)
    link.b.read_enabled = True
    _finish(link)
    assert bytes(link.b.received) == data


def test_syn_and_syn_ack_losses_are_retransmitted() -> None:
    link = connected_pair(b"hello", b"world", isn_a=5, isn_b=2**32 - 1)
    lost = {"syn": 2, "synack": 2}

    def flt(direction: str, seg) -> bool:  # type: ignore[no-untyped-def]
        if seg.flags == 0x02 and lost["syn"]:
            lost["syn"] -= 1
            return False
        if seg.flags == 0x12 and lost["synack"]:
            lost["synack"] -= 1
            return False
        return True

    link.filter = flt
    _finish(link)
    assert link.b.received == b"hello" and link.a.received == b"world"
    syns = [s for _, d, s in link.log if s.flags == 0x02]
    synacks = [s for _, d, s in link.log if s.flags == 0x12]
    assert len(syns) >= 3 and len(synacks) >= 3


@settings(max_examples=30, deadline=None)
@given(
    drop=st.sampled_from([0.0, 0.1, 0.3]),
    dup=st.sampled_from([0.0, 0.2]),
    isn_a=near_wrap,
    isn_b=near_wrap,
    seed=st.integers(0, 2**32),
)
def test_simultaneous_open_and_close_over_lossy_link(
    drop: float, dup: float, isn_a: int, isn_b: int, seed: int
) -> None:
    rng = random.Random(seed)
    a = Peer("a", rng.randbytes(rng.randrange(0, 20_000)))
    b = Peer("b", rng.randbytes(rng.randrange(0, 20_000)))
    link = Link(a, b, faults=LinkFaults(drop=drop, dup=dup, delay=0.002, jitter=0.002), rng=rng)
    cfg = TCPConfig(max_retries=40, syn_retries=40, max_rto=2.0)
    a.conn = TCPConnection.connect(A_ADDR, B_ADDR, 0.0, cfg, isn_a)
    b.conn = TCPConnection.connect(B_ADDR, A_ADDR, 0.0, cfg, isn_b)
    _finish(link)
    assert bytes(b.received) == bytes(a.to_send) and bytes(a.received) == bytes(b.to_send)
    assert a.closed == b.closed == ConnectionClosed(CloseReason.NORMAL)


def test_blind_rst_and_syn_injection_mid_transfer_is_not_obeyed() -> None:
    rng = random.Random(11)
    data = rng.randbytes(400_000)
    link = connected_pair(data, b"", faults=LinkFaults(delay=0.002), rng=rng)
    link.run(lambda: len(link.b.received) > 100_000, max_steps=10_000)
    b = link.b.conn
    assert b is not None
    # An attacker who guesses a sequence number inside B's window, but not RCV.NXT.
    for off in (1, 1000, 30_000):
        n_before = len(link.log)
        link.inject("a->b", Segment(40000, 80, (b.rcv_nxt + off) & 0xFFFFFFFF, 0, RST, 0))
        link.inject("a->b", Segment(40000, 80, (b.rcv_nxt + off) & 0xFFFFFFFF, 0, SYN, 512))
        challenges = [s for _, d, s in link.log[n_before:] if d == "b->a" and s.flags == ACK]
        assert len(challenges) >= 2
        assert b.state is TCPState.FIN_WAIT_2  # B had nothing to send; still receiving
        assert not any(isinstance(ev, ConnectionReset) for ev in link.b.events)
    _finish(link)
    assert bytes(link.b.received) == data
    assert link.a.closed == link.b.closed == ConnectionClosed(CloseReason.NORMAL)


@pytest.mark.parametrize(
    ("mss", "rate", "queue", "size"),
    [(1460, 20e6, 50, 3_000_000), (65495, 200e6, 8, 20_000_000)],
)
def test_tail_drop_bottleneck_keeps_the_pipe_full(
    mss: int, rate: float, queue: int, size: int
) -> None:
    """Congestion control and SACK recovery against a FIFO bottleneck that tail-drops.

    Virtual time, so the figure is exact: the transfer must use most of the bottleneck
    (losses repaired by fast recovery, not timeouts), and every byte must arrive.
    """
    data = random.Random(1).randbytes(size)
    cfg = TCPConfig(mss=mss)
    link = connected_pair(
        data,
        config_a=cfg,
        config_b=cfg,
        faults=LinkFaults(delay=0.001, rate=rate, queue_limit=queue),
        rng=random.Random(2),
    )
    link.run(lambda: len(link.b.received) == len(data), max_steps=200_000)
    assert link.tail_drops > 0  # the test means nothing if the queue never overflowed
    efficiency = len(data) / link.now / rate
    assert efficiency > 0.8, efficiency
    assert bytes(link.b.received) == data
