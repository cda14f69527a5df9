"""Sans-IO TCP core, hand-stepped: every transition, exact timer deadlines, RFC 5961."""

from __future__ import annotations

import pytest

from norouter_trio.tcp import seq as sq
from norouter_trio.tcp.connection import TCPConfig, TCPConnection
from norouter_trio.tcp.events import (
    CloseReason,
    ConnectionClosed,
    ConnectionReset,
    DataAvailable,
    EOFReceived,
    Established,
    Event,
    Writable,
)
from norouter_trio.tcp.packets import ACK, FIN, PSH, RST, SYN, Segment
from norouter_trio.tcp.state import Input, TCPState, TCPStateError, next_state, transitions

A = ("127.0.42.1", 40000)
B = ("127.0.42.2", 80)
S = TCPState


def events(conn: TCPConnection) -> list[Event]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def move(src: TCPConnection, dst: TCPConnection, now: float) -> list[Segment]:
    segs = src.segments_to_send(now)
    for seg in segs:
        dst.receive_segment(seg, now)
    return segs


def pump(a: TCPConnection, b: TCPConnection, now: float) -> None:
    for _ in range(1000):
        if not move(a, b, now) and not move(b, a, now):
            return
    raise AssertionError("pump did not go quiet")


def pump_fin(a: TCPConnection, b: TCPConnection, now: float) -> float:
    """`pump`, then let a FIN's ACK, held `fin_ack_delay` for our own FIN, go out.

    Returns the time at which everything went quiet."""
    pump(a, b, now)
    for c in (a, b):
        t = c.get_timer()
        if t is not None and t <= now + c.config.fin_ack_delay:
            c.handle_timer(t)
            now = t
            pump(a, b, now)
    return now


def pair(
    now: float = 0.0,
    cfg_a: TCPConfig | None = None,
    cfg_b: TCPConfig | None = None,
    isn_a: int = 1000,
    isn_b: int = 9000,
) -> tuple[TCPConnection, TCPConnection]:
    a = TCPConnection.connect(A, B, now, cfg_a or TCPConfig(), isn_a)
    (syn,) = a.segments_to_send(now)
    b = TCPConnection.accept(B, A, syn, now, cfg_b or TCPConfig(), isn_b)
    pump(a, b, now)
    assert a.state is S.ESTABLISHED and b.state is S.ESTABLISHED
    assert events(a) == [Established()] and events(b) == [Established()]
    return a, b


# ---------------------------------------------------------------- sequence numbers, table


def test_seq_arithmetic_wraps() -> None:
    top = sq.MASK
    assert sq.seq_add(top, 2) == 1
    assert sq.seq_lt(top, 1) and sq.seq_gt(1, top)
    assert sq.seq_diff(1, top) == 2 and sq.seq_diff(top, 1) == -2
    assert sq.seq_in_window(3, top - 1, 10) and not sq.seq_in_window(top - 2, top - 1, 10)
    assert sq.seq_max(top, 5) == 5 and sq.seq_le(5, 5) and sq.seq_ge(5, 5)


def test_transition_table_rejects_what_it_does_not_list() -> None:
    table = transitions()
    assert table[(S.SYN_SENT, Input.RCV_SYN)] is S.SYN_RECEIVED
    assert table[(S.FIN_WAIT_1, Input.RCV_FIN)] is S.CLOSING
    assert table[(S.TIME_WAIT, Input.RCV_RST)] is S.CLOSED
    with pytest.raises(TCPStateError, match="ESTABLISHED"):
        next_state(S.ESTABLISHED, Input.RCV_SYN_ACK)
    with pytest.raises(TCPStateError):
        next_state(S.CLOSED, Input.RCV_RST)


# ---------------------------------------------------------------- opening


def test_active_open_sends_syn_with_options_and_retransmits_with_backoff() -> None:
    a = TCPConnection.connect(A, B, 10.0, TCPConfig(syn_retries=2), isn=123)
    assert a.state is S.SYN_SENT
    (syn,) = a.segments_to_send(10.0)
    assert (syn.flags, syn.seq, syn.mss, syn.wscale) == (SYN, 123, 65495, 6)
    assert syn.sack_permitted and syn.ts_val is not None and syn.window == 65535
    assert a.get_timer() == 11.0  # initial RTO 1 s (RFC 6298 §2.1)
    a.handle_timer(10.5)
    assert a.segments_to_send(10.5) == []
    a.handle_timer(11.0)
    (again,) = a.segments_to_send(11.0)
    assert again.flags == SYN and again.seq == 123
    assert a.get_timer() == 13.0  # doubled
    a.handle_timer(13.0)
    assert a.segments_to_send(13.0)[0].flags == SYN
    assert a.get_timer() == 17.0
    a.handle_timer(17.0)  # third expiry: more than syn_retries
    assert a.state is S.CLOSED
    assert events(a) == [ConnectionClosed(CloseReason.TIMEOUT)]
    assert a.get_timer() is None


def test_passive_open_retransmits_syn_ack_and_answers_duplicate_syn() -> None:
    a = TCPConnection.connect(A, B, 0.0, TCPConfig(), isn=1)
    (syn,) = a.segments_to_send(0.0)
    b = TCPConnection.accept(B, A, syn, 0.0, TCPConfig(), isn=500)
    assert b.state is S.SYN_RECEIVED
    (synack,) = b.segments_to_send(0.0)
    assert synack.flags == SYN | ACK and synack.ack == 2 and synack.seq == 500
    assert synack.wscale == 6 and synack.sack_permitted and synack.ts_ecr == syn.ts_val
    assert b.get_timer() == 1.0
    b.handle_timer(1.0)
    (re,) = b.segments_to_send(1.0)
    assert re.flags == SYN | ACK and b.get_timer() == 3.0
    b.receive_segment(syn, 1.5)  # the peer retransmits its SYN: SYN-ACK again
    assert b.segments_to_send(1.5)[0].flags == SYN | ACK
    a.receive_segment(re, 2.0)
    assert a.state is S.ESTABLISHED and events(a) == [Established()]
    (ack,) = a.segments_to_send(2.0)
    assert ack.flags == ACK and ack.ack == 501
    b.receive_segment(ack, 2.0)
    assert b.state is S.ESTABLISHED and events(b) == [Established()]
    assert b.get_timer() is None


def test_simultaneous_open() -> None:
    a = TCPConnection.connect(A, B, 0.0, TCPConfig(), isn=100)
    b = TCPConnection.connect(B, A, 0.0, TCPConfig(), isn=200)
    (sa,) = a.segments_to_send(0.0)
    (sb,) = b.segments_to_send(0.0)
    a.receive_segment(sb, 0.01)
    b.receive_segment(sa, 0.01)
    assert a.state is S.SYN_RECEIVED and b.state is S.SYN_RECEIVED
    (sa2,) = a.segments_to_send(0.01)
    (sb2,) = b.segments_to_send(0.01)
    assert sa2.flags == SYN | ACK and sa2.seq == 100 and sa2.ack == 201
    a.receive_segment(sb2, 0.02)
    b.receive_segment(sa2, 0.02)
    assert a.state is S.ESTABLISHED and b.state is S.ESTABLISHED
    pump(a, b, 0.02)
    assert events(a) == [Established()] and events(b) == [Established()]
    a.send(b"ping", 0.03)
    pump(a, b, 0.03)
    assert b.read(100, 0.03) == b"ping"


def test_syn_sent_rst_means_refused_and_bad_ack_gets_rst() -> None:
    a = TCPConnection.connect(A, B, 0.0, TCPConfig(), isn=1000)
    a.segments_to_send(0.0)
    a.receive_segment(Segment(80, 40000, 0, 5, RST | ACK, 0), 0.1)  # wrong ACK: ignore
    assert a.state is S.SYN_SENT
    a.receive_segment(Segment(80, 40000, 77, 5, ACK, 0), 0.1)  # wrong ACK: RST seq=ack
    (rst,) = a.segments_to_send(0.1)
    assert rst.flags == RST and rst.seq == 5
    a.receive_segment(Segment(80, 40000, 0, 1001, RST | ACK, 0), 0.2)
    assert a.state is S.CLOSED and events(a) == [ConnectionClosed(CloseReason.REFUSED)]


def test_mss_window_scaling_and_timestamps_follow_the_peer() -> None:
    a = TCPConnection.connect(A, B, 0.0, TCPConfig(), isn=1)
    a.segments_to_send(0.0)
    # A peer that offers MSS 1000 and nothing else.
    a.receive_segment(Segment(80, 40000, 50, 2, SYN | ACK, 8000, mss=1000), 0.01)
    assert a.state is S.ESTABLISHED
    a.send(bytes(5000), 0.01)
    segs = a.segments_to_send(0.01)
    assert [len(s.payload) for s in segs if s.payload] == [1000, 1000, 1000, 1000]  # IW 4*SMSS
    assert all(s.ts_val is None and not s.sack_blocks for s in segs)
    assert all(s.window == 65535 for s in segs)  # unscaled: peer did not offer wscale
    # Without any MSS option the default is 536 (RFC 9293 §3.7.1).
    c = TCPConnection.connect(A, B, 0.0, TCPConfig(), isn=1)
    c.segments_to_send(0.0)
    c.receive_segment(Segment(80, 40000, 50, 2, SYN | ACK, 8000), 0.01)
    c.set_nodelay(True)
    c.send(bytes(600), 0.01)
    assert [len(s.payload) for s in c.segments_to_send(0.01) if s.payload] == [536, 64]


def test_data_on_syn_is_queued_until_established() -> None:
    syn = Segment(40000, 80, 10, 0, SYN, 5000, b"early", mss=1400)
    b = TCPConnection.accept(B, A, syn, 0.0, TCPConfig(), isn=90)
    (synack,) = b.segments_to_send(0.0)
    assert synack.ack == 16  # the SYN's data is acknowledged with it
    assert events(b) == [] and b.readable_bytes == 5
    b.receive_segment(Segment(40000, 80, 16, 91, ACK, 5000), 0.01)
    assert b.state is S.ESTABLISHED
    assert events(b) == [Established(), DataAvailable()]
    assert b.read(100, 0.01) == b"early"


def test_data_and_fin_on_syn_ack() -> None:
    a = TCPConnection.connect(A, B, 0.0, TCPConfig(), isn=10)
    a.segments_to_send(0.0)
    a.receive_segment(Segment(80, 40000, 90, 11, SYN | ACK | FIN, 5000, b"hello"), 0.01)
    assert a.state is S.CLOSE_WAIT
    assert events(a) == [Established(), DataAvailable(), EOFReceived()]
    assert a.read(100, 0.01) == b"hello"
    (ack,) = a.segments_to_send(0.01)
    assert ack.flags == ACK and ack.ack == 97  # 90 + SYN + 5 bytes + FIN


# ---------------------------------------------------------------- closing


def test_active_close_walks_fin_wait_and_time_wait_with_exact_deadline() -> None:
    a, b = pair(cfg_a=TCPConfig(time_wait=2.5))
    a.send(b"bye", 1.0)
    a.shutdown_write(1.0)
    assert a.state is S.FIN_WAIT_1
    (seg,) = a.segments_to_send(1.0)
    assert seg.flags == ACK | PSH | FIN and seg.payload == b"bye"  # FIN rides on the data
    b.receive_segment(seg, 1.0)
    assert b.state is S.CLOSE_WAIT
    assert events(b) == [DataAvailable(), EOFReceived()]
    assert b.segments_to_send(1.0) == []  # the ACK waits a moment for B's own FIN
    fin_ack_at = 1.0 + b.config.fin_ack_delay
    assert b.get_timer() == pytest.approx(fin_ack_at)
    b.handle_timer(fin_ack_at)
    (ack,) = b.segments_to_send(fin_ack_at)
    assert ack.flags == ACK and ack.ack == seg.seq + 4
    a.receive_segment(ack, 1.1)
    assert a.state is S.FIN_WAIT_2 and a.get_timer() is None
    b.shutdown_write(1.2)
    assert b.state is S.LAST_ACK
    (fin,) = b.segments_to_send(1.2)
    assert fin.flags == FIN | ACK
    a.receive_segment(fin, 1.3)
    assert a.state is S.TIME_WAIT and a.get_timer() == pytest.approx(3.8)
    assert events(a) == [EOFReceived()]
    (last,) = a.segments_to_send(1.3)
    # The last ACK is lost; B retransmits its FIN after its RTO; A re-ACKs and restarts.
    t = b.get_timer()
    assert t is not None
    b.handle_timer(t)
    (fin2,) = b.segments_to_send(t)
    assert fin2.flags & FIN and fin2.seq == fin.seq
    a.receive_segment(fin2, 2.0)
    assert a.get_timer() == pytest.approx(4.5)
    (ack2,) = a.segments_to_send(2.0)
    b.receive_segment(ack2, 2.0)
    assert b.state is S.CLOSED and events(b) == [ConnectionClosed(CloseReason.NORMAL)]
    a.handle_timer(4.49)
    assert a.state is S.TIME_WAIT
    a.handle_timer(4.5)
    assert a.state is S.CLOSED and events(a) == [ConnectionClosed(CloseReason.NORMAL)]
    assert last.flags == ACK


def test_simultaneous_close_goes_through_closing() -> None:
    a, b = pair()
    a.shutdown_write(1.0)
    b.shutdown_write(1.0)
    (fa,) = a.segments_to_send(1.0)
    (fb,) = b.segments_to_send(1.0)
    a.receive_segment(fb, 1.01)
    b.receive_segment(fa, 1.01)
    assert a.state is S.CLOSING and b.state is S.CLOSING
    pump(a, b, 1.02)
    assert a.state is S.TIME_WAIT and b.state is S.TIME_WAIT
    assert a.get_timer() == pytest.approx(2.02) and b.get_timer() == pytest.approx(2.02)
    a.handle_timer(2.02)
    b.handle_timer(2.02)
    assert events(a)[-1] == ConnectionClosed(CloseReason.NORMAL)
    assert events(b)[-1] == ConnectionClosed(CloseReason.NORMAL)


def test_shutdown_before_established_sends_fin_after_handshake() -> None:
    a = TCPConnection.connect(A, B, 0.0, TCPConfig(), isn=5)
    a.send(b"req", 0.0)
    a.shutdown_write(0.0)
    assert a.state is S.SYN_SENT
    (syn,) = a.segments_to_send(0.0)
    b = TCPConnection.accept(B, A, syn, 0.0, TCPConfig(), isn=7)
    pump_fin(a, b, 0.0)
    assert a.state is S.FIN_WAIT_2 and b.state is S.CLOSE_WAIT
    assert b.read(10, 0.0) == b"req"


def test_close_with_unread_data_resets() -> None:
    a, b = pair()
    a.send(b"unread", 0.0)
    pump(a, b, 0.0)
    events(b)
    b.close(0.1)
    (rst,) = b.segments_to_send(0.1)
    assert rst.flags & RST and b.state is S.CLOSED
    assert events(b) == [ConnectionClosed(CloseReason.RESET)]
    a.receive_segment(rst, 0.1)
    assert events(a) == [ConnectionReset(), ConnectionClosed(CloseReason.RESET)]


def test_close_in_syn_sent_without_data_just_closes() -> None:
    a = TCPConnection.connect(A, B, 0.0, TCPConfig(), isn=5)
    a.segments_to_send(0.0)
    a.close(0.1)
    assert a.state is S.CLOSED and a.segments_to_send(0.1) == []
    assert events(a) == [ConnectionClosed(CloseReason.NORMAL)]
    with pytest.raises(TCPStateError, match=r"127\.0\.42\.2:80"):
        a.send(b"x", 0.2)


# ---------------------------------------------------------------- RST in every state


def _drive_to(state: TCPState) -> tuple[TCPConnection, TCPConnection]:
    """`a` in `state` (b its peer), with nothing in flight."""
    if state is S.SYN_RECEIVED:
        a0 = TCPConnection.connect(B, A, 0.0, TCPConfig(), isn=3000)
        (syn,) = a0.segments_to_send(0.0)
        a = TCPConnection.accept(A, B, syn, 0.0, TCPConfig(), isn=1000)
        a.segments_to_send(0.0)
        return a, a0
    a, b = pair()
    if state is S.ESTABLISHED:
        return a, b
    if state in (S.FIN_WAIT_1, S.CLOSING):
        a.shutdown_write(0.0)
        fin = a.segments_to_send(0.0)
        if state is S.CLOSING:
            b.shutdown_write(0.0)
            a.receive_segment(b.segments_to_send(0.0)[0], 0.0)
            assert fin
        return a, b
    if state in (S.FIN_WAIT_2, S.TIME_WAIT):
        a.shutdown_write(0.0)
        pump_fin(a, b, 0.0)
        if state is S.TIME_WAIT:
            b.shutdown_write(0.0)
            pump(a, b, 0.0)
        return a, b
    if state in (S.CLOSE_WAIT, S.LAST_ACK):
        b.shutdown_write(0.0)
        pump(a, b, 0.0)
        if state is S.LAST_ACK:
            a.shutdown_write(0.0)
            a.segments_to_send(0.0)
        return a, b
    raise AssertionError(state)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (S.SYN_RECEIVED, CloseReason.REFUSED),
        (S.ESTABLISHED, CloseReason.RESET),
        (S.FIN_WAIT_1, CloseReason.RESET),
        (S.FIN_WAIT_2, CloseReason.RESET),
        (S.CLOSE_WAIT, CloseReason.RESET),
        (S.CLOSING, CloseReason.NORMAL),
        (S.LAST_ACK, CloseReason.RESET),
        (S.TIME_WAIT, CloseReason.NORMAL),
    ],
)
def test_exact_rst_closes_every_state(state: TCPState, reason: CloseReason) -> None:
    a, _ = _drive_to(state)
    assert a.state is state
    events(a)
    a.receive_segment(Segment(80, 40000, a.rcv_nxt, 0, RST, 0), 5.0)
    assert a.state is S.CLOSED
    evs = events(a)
    assert evs[-1] == ConnectionClosed(reason)
    assert (ConnectionReset() in evs) == (reason is CloseReason.RESET)
    assert a.get_timer() is None


def test_closed_connection_answers_with_rst() -> None:
    a, _ = pair()
    a.abort(0.0)
    a.segments_to_send(0.0)
    a.receive_segment(Segment(80, 40000, 5, 777, ACK, 100, b"zz"), 0.1)
    (rst,) = a.segments_to_send(0.1)
    assert rst.flags == RST and rst.seq == 777


# ---------------------------------------------------------------- RFC 5961


def test_blind_rst_in_window_gets_challenge_ack_not_obeyed() -> None:
    a, _ = pair()
    a.receive_segment(Segment(80, 40000, (a.rcv_nxt + 100) & sq.MASK, 0, RST, 0), 0.1)
    assert a.state is S.ESTABLISHED
    (challenge,) = a.segments_to_send(0.1)
    assert challenge.flags == ACK and challenge.ack == a.rcv_nxt and challenge.seq == a.snd_nxt
    a.receive_segment(Segment(80, 40000, (a.rcv_nxt - 100) & sq.MASK, 0, RST, 0), 0.1)
    assert a.state is S.ESTABLISHED and a.segments_to_send(0.1) == []  # outside: silent
    assert events(a) == []


def test_blind_syn_in_established_gets_challenge_ack_rate_limited() -> None:
    a, _ = pair(cfg_a=TCPConfig(challenge_ack_limit=3))
    sent = []
    for i in range(5):
        a.receive_segment(Segment(80, 40000, a.rcv_nxt + i, 0, SYN, 1000), 0.5)
        sent += a.segments_to_send(0.5)
    assert a.state is S.ESTABLISHED
    assert len(sent) == 3 and all(s.flags == ACK and s.ack == a.rcv_nxt for s in sent)
    a.receive_segment(Segment(80, 40000, a.rcv_nxt, 0, SYN, 1000), 1.6)
    assert len(a.segments_to_send(1.6)) == 1  # a new second, a new allowance


def test_ack_for_unsent_data_is_answered_and_dropped() -> None:
    a, _ = pair()
    a.receive_segment(Segment(80, 40000, a.rcv_nxt, a.snd_nxt + 50, ACK, 100, b"x"), 0.1)
    assert a.readable_bytes == 0
    (ack,) = a.segments_to_send(0.1)
    assert ack.flags == ACK and ack.ack == a.rcv_nxt


# ---------------------------------------------------------------- timers and data


def test_delayed_ack_timer_and_every_second_segment() -> None:
    a, b = pair(cfg_b=TCPConfig(delayed_ack=0.03))
    a.set_nodelay(True)
    a.send(b"one", 1.0)
    (s1,) = a.segments_to_send(1.0)
    b.receive_segment(s1, 1.0)
    assert b.segments_to_send(1.0) == [] and b.get_timer() == pytest.approx(1.03)
    b.handle_timer(1.03)
    (ack,) = b.segments_to_send(1.03)
    assert ack.ack == s1.seq + 3 and b.get_timer() is None
    a.send(b"two", 1.1)
    a.send(b"three", 1.1)
    b.receive_segment(a.segments_to_send(1.1)[0], 1.1)
    a.send(b"four", 1.1)
    for seg in a.segments_to_send(1.1):
        b.receive_segment(seg, 1.1)
    assert len(b.segments_to_send(1.1)) == 1  # second segment: ACK at once


def test_rto_deadline_retransmission_backoff_and_user_timeout() -> None:
    a, _ = pair(cfg_a=TCPConfig(max_retries=3, min_rto=0.2, tail_loss_probe=False))
    a.send(b"data", 0.0)
    (d,) = a.segments_to_send(0.0)
    deadlines = []
    for _ in range(3):
        t = a.get_timer()
        assert t is not None
        deadlines.append(t)
        a.handle_timer(t)
        (re,) = a.segments_to_send(t)
        assert re.seq == d.seq and re.payload == b"data"
    # The handshake measured an RTT of 0, so the RTO starts at the 0.2 s floor.
    assert [round(x, 6) for x in deadlines] == [0.2, 0.6, 1.4]
    t = a.get_timer()
    assert t == pytest.approx(3.0)
    a.handle_timer(t)
    assert a.state is S.CLOSED
    (rst,) = a.segments_to_send(t)
    assert rst.flags & RST
    assert events(a) == [ConnectionClosed(CloseReason.TIMEOUT)]


def test_rtt_sample_sets_rto_with_floor() -> None:
    a, b = pair(cfg_a=TCPConfig(min_rto=0.2, tail_loss_probe=False))
    a.send(b"x", 10.0)
    move(a, b, 10.0)
    b.handle_timer(10.04)
    move(b, a, 10.05)  # RTT 50 ms -> RTO = 0.05 + 4*0.025 = 0.15 -> floored to 0.2
    a.send(b"y", 10.05)
    a.segments_to_send(10.05)
    assert a.get_timer() == pytest.approx(10.25)


def test_out_of_order_is_acked_at_once_with_sack_and_gap_fill_too() -> None:
    a, b = pair(cfg_a=TCPConfig(mss=1000))
    a.send(bytes(range(256)) * 12, 0.0)
    segs = [s for s in a.segments_to_send(0.0) if s.payload]
    assert len(segs) >= 3
    b.receive_segment(segs[1], 0.0)
    (dup,) = b.segments_to_send(0.0)
    assert dup.ack == segs[0].seq
    assert dup.sack_blocks == ((segs[1].seq, segs[1].seq + len(segs[1].payload)),)
    b.receive_segment(segs[0], 0.0)
    (fill,) = b.segments_to_send(0.0)
    assert fill.ack == segs[1].seq + len(segs[1].payload) and fill.sack_blocks == ()
    assert b.read(5000, 0.0) == (bytes(range(256)) * 12)[: 2 * len(segs[0].payload)]


def test_fast_retransmit_before_rto() -> None:
    cfg = TCPConfig(mss=1000)
    a, b = pair(cfg_a=cfg, cfg_b=cfg)
    data = bytes(200_000)
    sent = a.send(data, 0.0)
    # Grow cwnd with a few clean round trips.
    now = 0.0
    for _ in range(6):
        now += 0.01
        pump(a, b, now)
        b.read(1 << 20, now)
    a.send(data[:20_000], now)
    segs = [s for s in a.segments_to_send(now) if s.payload]
    assert len(segs) >= 6
    lost = segs[0]
    for seg in segs[1:]:
        b.receive_segment(seg, now + 0.001)
    for ack in b.segments_to_send(now + 0.001):
        a.receive_segment(ack, now + 0.002)
    re = [s for s in a.segments_to_send(now + 0.002) if s.seq == lost.seq and s.payload]
    assert re, "expected a fast retransmission of the lost segment"
    assert sent == len(data)


def test_nagle_holds_small_segments_until_ack_and_nodelay_does_not() -> None:
    a, _ = pair()
    a.send(b"a", 0.0)
    assert len(a.segments_to_send(0.0)) == 1
    a.send(b"b", 0.0)
    assert a.segments_to_send(0.0) == []  # Nagle: one small segment in flight
    a.set_nodelay(True)
    a.send(b"c", 0.0)
    (seg,) = a.segments_to_send(0.0)
    assert seg.payload == b"bc"


def test_send_buffer_is_bounded_and_writable_follows() -> None:
    a, b = pair(cfg_a=TCPConfig(send_buffer=10_000))
    assert a.send(bytes(15_000), 0.0) == 10_000
    assert a.bytes_in_send_buffer == 10_000
    assert a.send(b"more", 0.0) == 0
    pump(a, b, 0.0)
    b.handle_timer(0.04)  # one segment only: its ACK was delayed
    pump(a, b, 0.04)
    assert a.bytes_in_send_buffer == 0
    assert Writable() in events(a)
    assert b.readable_bytes == 10_000


def test_zero_window_persist_probe_and_reopen() -> None:
    a, b = pair(cfg_b=TCPConfig(recv_buffer=4096))
    a.set_nodelay(True)
    assert a.send(bytes(20_000), 0.0) == 20_000
    now = 0.0
    for _ in range(10):
        now += 0.01
        pump(a, b, now)
        for c in (a, b):
            if (t := c.get_timer()) is not None and t <= now:
                c.handle_timer(now)
    assert b.readable_bytes == 4096 and a.snd_wnd == 0
    t = a.get_timer()
    assert t is not None  # the persist timer, one RTO from when the window closed
    probe_time = t
    a.handle_timer(t)
    (probe,) = a.segments_to_send(t)
    assert probe.seq == (a.snd_una - 1) & sq.MASK and probe.payload == b""
    b.receive_segment(probe, t)
    (answer,) = b.segments_to_send(t)
    assert answer.window == 0 and answer.ack == a.snd_una
    a.receive_segment(answer, t)
    t2 = a.get_timer()
    assert t2 is not None and t2 - probe_time > 0.2  # backed off
    # The reader drains: a window update goes out by itself and data resumes.
    got = b.read(1 << 20, t)
    (update,) = b.segments_to_send(t)
    assert update.window > 0
    a.receive_segment(update, t)
    assert a.get_timer() != t2
    total = len(got)
    now = t
    for _ in range(200):
        now += 0.01
        pump(a, b, now)
        total += len(b.read(1 << 20, now))
        for c in (a, b):
            if (tt := c.get_timer()) is not None and tt <= now:
                c.handle_timer(now)
        if total == 20_000:
            break
    assert total == 20_000


def test_window_scaled_advertisement_never_shrinks() -> None:
    a, b = pair()
    a.send(bytes(300_000), 0.0)
    right_edges = []
    now = 0.0
    for _ in range(50):
        now += 0.001
        for seg in move(b, a, now):
            right_edges.append(seg.ack + (seg.window << 6))
        move(a, b, now)
    assert right_edges == sorted(right_edges)
    assert b.readable_bytes == 300_000


def test_fast_retransmit_newreno_without_sack_on_three_dupacks() -> None:
    cfg = TCPConfig(mss=1000, sack=False, timestamps=False)
    a, b = pair(cfg_a=cfg, cfg_b=cfg)
    now = 0.0
    a.send(bytes(100_000), now)
    for _ in range(6):
        now += 0.01
        pump(a, b, now)
        b.read(1 << 20, now)
    a.send(bytes(20_000), now)
    segs = [s for s in a.segments_to_send(now) if s.payload]
    assert len(segs) >= 6
    lost = segs[0]
    rto_deadline = a.get_timer()
    dupacks = 0
    for seg in segs[1:4]:
        b.receive_segment(seg, now)
        for ack in b.segments_to_send(now):
            assert ack.ack == lost.seq and not ack.sack_blocks
            dupacks += 1
            a.receive_segment(ack, now)
    assert dupacks == 3
    re = a.segments_to_send(now)
    assert [s.seq for s in re if s.payload][:1] == [lost.seq]
    assert a.get_timer() == rto_deadline  # no timeout was needed


def test_fin_wait_2_gives_up_after_close_if_peer_never_finishes() -> None:
    a, b = pair(cfg_a=TCPConfig(fin_wait_2_timeout=5.0))
    a.shutdown_write(1.0)
    pump_fin(a, b, 1.0)
    assert a.state is S.FIN_WAIT_2 and a.get_timer() is None  # half-close: wait forever
    a.close(2.0)
    assert a.get_timer() == pytest.approx(7.0)
    a.handle_timer(7.0)
    assert a.state is S.CLOSED and events(a)[-1] == ConnectionClosed(CloseReason.NORMAL)


def test_persist_override_sends_into_a_small_window() -> None:
    # A receiver whose window stays below half its largest offer: after the persist
    # timer the sender fills it anyway (RFC 9293 §3.8.6.2.1 override timeout).
    a, b = pair(cfg_b=TCPConfig(recv_buffer=10_000))
    a.set_nodelay(True)
    a.send(bytes(9_000), 0.0)
    pump(a, b, 0.0)
    b.handle_timer(0.04)
    pump(a, b, 0.04)
    b.read(3_000, 0.05)  # frees 3000 < min(5000, MSS): no window update by itself
    assert b.segments_to_send(0.05) == []
    a.send(bytes(5_000), 0.05)
    assert a.segments_to_send(0.05) == []  # 1000 bytes of window: too small to use
    t = a.get_timer()
    assert t is not None
    a.handle_timer(t)
    (small,) = a.segments_to_send(t)
    assert len(small.payload) == 1000


def _request_read_by_b(cfg_b: TCPConfig | None = None) -> tuple[TCPConnection, TCPConnection]:
    """A sends a request head (then a Nagle-held tail); B receives and reads the head."""
    a, b = pair(cfg_b=cfg_b)
    a.send(b"GET / HTTP/1.1\r\n", 0.0)
    (head,) = a.segments_to_send(0.0)
    a.send(b"Host: x\r\n\r\n", 0.0)
    assert a.segments_to_send(0.0) == []  # Nagle holds the second small write
    b.receive_segment(head, 0.001)
    assert b.segments_to_send(0.001) == []  # delayed ACK pending (40 ms)
    assert b.read(100, 0.002) == b"GET / HTTP/1.1\r\n"
    return a, b


def test_reading_pushed_data_acks_within_pushed_ack_delay() -> None:
    a, b = _request_read_by_b()
    # Consumed: the ACK (and the first scaled window update) waits 2 ms, not 40, for
    # an answer to ride on; none comes, so it goes alone and Nagle's tail follows.
    assert b.segments_to_send(0.002) == []
    assert b.get_timer() == pytest.approx(0.004)
    b.handle_timer(0.004)
    (ack,) = b.segments_to_send(0.004)
    assert ack.ack == b.rcv_nxt and not ack.payload
    a.receive_segment(ack, 0.005)
    (rest,) = a.segments_to_send(0.005)
    assert rest.payload == b"Host: x\r\n\r\n"


def test_an_answer_within_pushed_ack_delay_carries_the_ack() -> None:
    a, b = _request_read_by_b()
    b.send(b"HTTP/1.1 200 OK\r\n", 0.003)
    (reply,) = b.segments_to_send(0.003)  # one segment: data, ACK and window together
    assert reply.payload == b"HTTP/1.1 200 OK\r\n" and reply.ack == b.rcv_nxt
    assert reply.window << b._rcv_wscale > 65535  # the scaled window rode along too
    b.handle_timer(0.004)
    assert b.segments_to_send(0.004) == []  # no separate ACK after all
    a.receive_segment(reply, 0.004)
    (rest,) = a.segments_to_send(0.004)
    assert rest.payload == b"Host: x\r\n\r\n"


def test_pushed_ack_delay_zero_acks_at_once() -> None:
    _, b = _request_read_by_b(TCPConfig(pushed_ack_delay=0.0))
    (ack,) = b.segments_to_send(0.002)
    assert ack.ack == b.rcv_nxt
    with pytest.raises(ValueError, match="pushed_ack_delay"):
        TCPConfig(pushed_ack_delay=0.6)
    with pytest.raises(ValueError, match="fin_ack_delay"):
        TCPConfig(fin_ack_delay=-1)


def test_fin_ahead_of_a_gap_is_kept_and_applied_when_the_gap_fills() -> None:
    a, b = pair()
    a.set_nodelay(True)
    a.send(b"abc", 0.0)
    (first,) = a.segments_to_send(0.0)
    a.receive_segment(Segment(80, 40000, b.snd_nxt, first.seq + 3, ACK, 1000), 0.0)
    a.shutdown_write(0.0)
    (fin,) = a.segments_to_send(0.0)
    assert fin.flags & FIN and not fin.payload
    b.receive_segment(fin, 0.01)  # FIN arrives before the data it follows
    assert b.state is S.ESTABLISHED
    b.receive_segment(first, 0.02)
    assert b.state is S.CLOSE_WAIT and b.read(10, 0.02) == b"abc"
    assert EOFReceived() in events(b)


def test_every_listed_transition_is_taken_by_some_scenario(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import norouter_trio.tcp.connection as connection_module

    seen: set[tuple[TCPState, Input]] = set()

    def spy(state: TCPState, inp: Input) -> TCPState:
        seen.add((state, inp))
        return next_state(state, inp)

    monkeypatch.setattr(connection_module, "next_state", spy)
    # The connection looks transitions up in its own copy of the table first and calls
    # next_state only for what that lacks: empty it so every transition is seen here.
    monkeypatch.setattr(connection_module, "_TRANSITIONS", {})
    test_active_open_sends_syn_with_options_and_retransmits_with_backoff()
    test_passive_open_retransmits_syn_ack_and_answers_duplicate_syn()
    test_simultaneous_open()
    test_syn_sent_rst_means_refused_and_bad_ack_gets_rst()
    test_active_close_walks_fin_wait_and_time_wait_with_exact_deadline()
    test_simultaneous_close_goes_through_closing()
    test_close_in_syn_sent_without_data_just_closes()
    test_close_with_unread_data_resets()
    test_fin_wait_2_gives_up_after_close_if_peer_never_finishes()
    test_rto_deadline_retransmission_backoff_and_user_timeout()
    test_exact_rst_closes_every_state(S.SYN_RECEIVED, CloseReason.REFUSED)
    for state in (S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT, S.LAST_ACK):
        test_exact_rst_closes_every_state(state, CloseReason.RESET)
    for state in (S.CLOSING, S.TIME_WAIT):
        test_exact_rst_closes_every_state(state, CloseReason.NORMAL)
    any_state = (Input.APP_ABORT, Input.GIVE_UP, Input.RCV_RST)
    listed = {key for key in transitions() if key[1] not in any_state}
    assert listed - seen == set()
    assert {(st, Input.RCV_RST) for st in S if st not in (S.CLOSED, S.LISTEN, S.SYN_SENT)} <= seen


def test_filling_the_send_buffer_exactly_also_promises_writable() -> None:
    a, b = pair(cfg_a=TCPConfig(send_buffer=4000))
    assert a.send(bytes(4000), 0.0) == 4000
    assert a.send_buffer_free == 0
    pump(a, b, 0.0)
    b.handle_timer(0.04)
    pump(a, b, 0.04)
    assert events(a) == [Writable()] and a.send_buffer_free == 4000


def test_pure_ack_from_the_right_window_edge_is_accepted_not_answered() -> None:
    # A filled B's whole window; A's next pure ACK carries SEQ = B's right edge. Taking
    # that as out-of-window made both ends ACK each other forever (found by the lossy
    # link tests); it must simply be processed.
    a, b = pair(cfg_a=TCPConfig(tail_loss_probe=False), cfg_b=TCPConfig(recv_buffer=3000))
    a.set_nodelay(True)
    a.send(bytes(3000), 0.0)
    held = a.segments_to_send(0.0)  # in flight, not delivered yet
    assert sum(len(s.payload) for s in held) == 3000
    b.send(b"x", 0.0)
    (bseg,) = b.segments_to_send(0.0)
    a.receive_segment(bseg, 0.001)
    a.handle_timer(0.05)
    (ack,) = a.segments_to_send(0.05)
    assert ack.seq == (b.rcv_nxt + 3000) & sq.MASK and not ack.payload
    b.receive_segment(ack, 0.051)
    assert b.snd_una == (bseg.seq + 1) & sq.MASK
    assert b.segments_to_send(0.051) == []


def test_out_of_window_pure_acks_are_answered_at_a_limited_rate() -> None:
    a, _ = pair(cfg_a=TCPConfig(challenge_ack_limit=2))
    answers = 0
    for _ in range(10):
        a.receive_segment(Segment(80, 40000, (a.rcv_nxt - 5000) & sq.MASK, a.snd_nxt, ACK, 9), 1.0)
        answers += len(a.segments_to_send(1.0))
    assert answers == 2


def test_tail_loss_probe_resends_the_last_segment_before_the_rto() -> None:
    a, b = pair()
    a.set_nodelay(True)
    a.send(b"warm", 1.0)
    move(a, b, 1.0)
    b.handle_timer(1.04)
    move(b, a, 1.05)  # RTT samples 0 (handshake) and 50 ms
    srtt = a._rto.srtt
    assert srtt is not None and srtt > 0
    a.send(bytes(3000), 2.0)
    (last,) = a.segments_to_send(2.0)  # lost on the way
    # PTO = 2*SRTT + delayed-ACK allowance (one segment in flight), before the RTO.
    assert a.get_timer() == pytest.approx(2.0 + max(2 * srtt + 0.04, 0.01))
    assert a._rto_deadline == pytest.approx(2.2)
    t = a.get_timer()
    assert t is not None
    a.handle_timer(t)
    (probe,) = a.segments_to_send(t)
    assert probe.seq == last.seq and probe.payload == last.payload
    b.receive_segment(probe, t)
    b.handle_timer(t + 0.04)
    move(b, a, t + 0.04)
    assert a.snd_una == a.snd_max and a.get_timer() is None


def test_rto_with_a_closed_window_probes_instead_of_resending() -> None:
    # B's window closed while A still had data out, and the update reopening it was
    # lost: A's RTO must probe (not push data past the window) and resume on the answer.
    a, b = pair(cfg_a=TCPConfig(tail_loss_probe=False, max_retries=3))
    a.set_nodelay(True)
    a.send(b"x" * 100, 0.0)
    (seg,) = a.segments_to_send(0.0)
    zero = Segment(80, 40000, b.snd_nxt, seg.seq, ACK, 0)  # acks nothing, window 0
    a.receive_segment(zero, 0.01)
    assert a.snd_wnd == 0
    for _ in range(5):  # more than max_retries: a live peer keeps answering
        t = a.get_timer()
        assert t is not None
        a.handle_timer(t)
        (probe,) = a.segments_to_send(t)
        assert probe.seq == (a.snd_una - 1) & sq.MASK and not probe.payload
        a.receive_segment(zero, t)
    assert a.state is S.ESTABLISHED
    a.receive_segment(Segment(80, 40000, b.snd_nxt, seg.seq, ACK, 1000), 9.0)
    a.handle_timer(a.get_timer() or 9.0)
    (again,) = [s for s in a.segments_to_send(9.0) if s.payload]
    assert again.seq == seg.seq and again.payload == seg.payload


# ---------------------------------------------------------------- ACK of a FIN rides on ours


def _response_with_fin(cfg_a: TCPConfig | None = None) -> tuple[TCPConnection, Segment]:
    """`a` (ESTABLISHED) receives data + FIN at t=1.0, as a client receives an HTTP
    response from a server that closes; returns `a` and that segment."""
    a, b = pair(cfg_a=cfg_a)
    b.send(b"HTTP/1.0 200 OK\r\n\r\n", 1.0)
    b.shutdown_write(1.0)
    (seg,) = b.segments_to_send(1.0)
    assert seg.flags == ACK | PSH | FIN
    a.receive_segment(seg, 1.0)
    assert a.state is S.CLOSE_WAIT
    assert events(a) == [DataAvailable(), EOFReceived()]
    return a, seg


def test_fin_ack_rides_on_our_fin_when_the_app_closes_within_the_delay() -> None:
    a, seg = _response_with_fin()
    delay = a.config.fin_ack_delay
    assert delay > a.config.pushed_ack_delay
    assert a.segments_to_send(1.0) == []  # held for our FIN
    assert a.get_timer() == pytest.approx(1.0 + delay)
    assert a.read(100, 1.0005) == b"HTTP/1.0 200 OK\r\n\r\n"
    # Reading the pushed data neither flushes it nor shortens the wait to
    # pushed_ack_delay: after the FIN nothing more can come that the ACK would unblock.
    assert a.segments_to_send(1.0005) == []
    assert a.get_timer() == pytest.approx(1.0 + delay)
    a.close(1.01)
    (fin,) = a.segments_to_send(1.01)  # one segment: our FIN carrying the ACK
    assert fin.flags == FIN | ACK and fin.ack == seg.seq + len(seg.payload) + 1
    assert a.state is S.LAST_ACK
    t = a.get_timer()
    assert t is not None and t > 1.0 + delay  # the FIN's loss probe / RTO; no delayed ACK
    a.handle_timer(1.0 + delay)
    assert a.segments_to_send(1.0 + delay) == []


def test_fin_ack_goes_out_alone_at_the_deadline_when_the_app_does_not_close() -> None:
    a, seg = _response_with_fin()
    deadline = 1.0 + a.config.fin_ack_delay
    assert a.segments_to_send(1.001) == []
    a.handle_timer(deadline - 0.0001)
    assert a.segments_to_send(deadline - 0.0001) == []
    assert a.get_timer() == pytest.approx(deadline)
    a.handle_timer(deadline)
    (ack,) = a.segments_to_send(deadline)
    assert ack.flags == ACK and not ack.payload
    assert ack.ack == seg.seq + len(seg.payload) + 1
    assert a.get_timer() is None  # CLOSE-WAIT, nothing in flight: no timer left


def test_fin_ack_is_sent_at_once_without_fin_ack_delay_or_after_our_fin() -> None:
    a, seg = _response_with_fin(TCPConfig(fin_ack_delay=0.0))
    (ack,) = a.segments_to_send(1.0)
    assert ack.flags == ACK and ack.ack == seg.seq + len(seg.payload) + 1
    # Our FIN went first (FIN-WAIT): the peer's FIN is ACKed at once, as before.
    a, b = pair()
    a.shutdown_write(1.0)
    pump(a, b, 1.0)
    assert a.state is S.FIN_WAIT_1
    b.shutdown_write(1.001)
    (fin,) = b.segments_to_send(1.001)
    assert fin.flags == FIN | ACK  # B's held ACK of A's FIN rides on B's FIN
    a.receive_segment(fin, 1.001)
    assert a.state is S.TIME_WAIT
    (last,) = a.segments_to_send(1.001)
    assert last.flags == ACK and last.ack == fin.seq + 1
