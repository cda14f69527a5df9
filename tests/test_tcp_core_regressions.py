"""Regressions found by stress runs, replayed deterministically on the sans-IO core.

Tail loss probe beyond SND.MAX (scenario `concurrent.yaml`, 100 echo connections, a rare
60 s stall): the trio layer runs a connection's timer and its output in different tasks,
so the application can queue data (`send`) and the PTO can fire before that data was ever
transmitted. The probe then took "the last segment" from the end of the send *buffer*,
i.e. bytes beyond SND.MAX, without advancing SND.MAX. The receiver filled the gap later
and acknowledged past SND.MAX; RFC 9293 says to drop such an ACK, so SND.UNA froze, the
congestion window stayed full and every RTO resent old data that the peer acknowledged
past SND.MAX again: a stall that only the retry limit (minutes) ends.
"""

from __future__ import annotations

from norouter_trio.tcp import seq as sq
from norouter_trio.tcp.connection import TCPConfig, TCPConnection
from norouter_trio.tcp.events import Event
from norouter_trio.tcp.packets import FIN, SYN, Segment
from norouter_trio.tcp.state import TCPState

A = ("127.0.42.101", 40000)
B = ("127.0.42.102", 9000)


def _drain(conn: TCPConnection) -> list[Event]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def _end(seg: Segment) -> int:
    """One past the last sequence number the segment occupies."""
    n = len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
    return (seg.seq + n) & sq.MASK


def _pair(cfg: TCPConfig | None = None) -> tuple[TCPConnection, TCPConnection]:
    cfg = cfg or TCPConfig()
    a = TCPConnection.connect(A, B, 0.0, cfg, isn=1000)
    (syn,) = a.segments_to_send(0.0)
    b = TCPConnection.accept(B, A, syn, 0.0, cfg, isn=900_000)
    (synack,) = b.segments_to_send(0.005)
    a.receive_segment(synack, 0.01)  # an RTT sample, so the PTO can be armed
    for seg in a.segments_to_send(0.01):
        b.receive_segment(seg, 0.01)
    assert a.state is TCPState.ESTABLISHED and b.state is TCPState.ESTABLISHED
    _drain(a)
    _drain(b)
    a.set_nodelay(True)
    return a, b


class _Wire:
    """Both directions of a lossless link, stepped by hand; checks the ACK invariant."""

    def __init__(self, a: TCPConnection, b: TCPConnection) -> None:
        self.a, self.b = a, b
        self.received = bytearray()

    def check_segments(self, sender: TCPConnection, segs: list[Segment]) -> None:
        for seg in segs:
            assert sq.seq_le(_end(seg), sender.snd_max), (
                f"segment {seg.seq}..{_end(seg)} goes beyond SND.MAX {sender.snd_max}"
            )

    def exchange(self, now: float) -> bool:
        """Move everything both sides have to send; True if anything moved."""
        moved = False
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            segs = src.segments_to_send(now)
            self.check_segments(src, segs)
            for seg in segs:
                assert sq.seq_le(seg.ack, dst.snd_max), (
                    f"ACK {seg.ack} beyond the peer's SND.MAX {dst.snd_max}: it is dropped"
                )
                dst.receive_segment(seg, now)
                moved = True
            _drain(dst)
        while self.b.readable_bytes:
            self.received += self.b.read(1 << 20, now)
        return moved

    def run(self, now: float, until: float) -> float:
        """Exchange and run timers until both are idle or `until` (simulated seconds)."""
        while now < until:
            for _ in range(10_000):
                if not self.exchange(now):
                    break
            deadlines = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None]
            if not deadlines:
                return now
            now = max(now, min(deadlines))
            for conn in (self.a, self.b):
                t = conn.get_timer()
                if t is not None and t <= now:
                    conn.handle_timer(now)
        return now


def _probe_with_data_queued_behind_it(
    a: TCPConnection, big: bytes, *, then_rto: bool = False
) -> tuple[float, list[Segment], list[Segment]]:
    """A small write in flight arms the PTO; the application then queues `big`, and the
    PTO (and with `then_rto` the RTO too) fires before any output ran for it: what the
    trio layer's timer task does while its writer waits on a full outbound channel.

    Returns the time, the small write's segments and everything sent after the timers.
    """
    now = 0.1
    assert a.send(b"a" * 10, now) == 10
    first = a.segments_to_send(now)
    assert len(first) == 1 and len(first[0].payload) == 10
    pto = a.get_timer()
    assert pto is not None and pto < now + 1.0, "no tail loss probe armed"
    assert a.send(big, now) == len(big)  # queued only: no segments_to_send yet
    a.handle_timer(pto)
    now = pto
    if then_rto:
        rto = a.get_timer()
        assert rto is not None
        a.handle_timer(rto)
        now = rto
    return now, first, a.segments_to_send(now)


def test_tail_loss_probe_never_sends_beyond_snd_max() -> None:
    a, _ = _pair()
    _, _, out = _probe_with_data_queued_behind_it(a, bytes(range(256)) * 2000)
    for seg in out:
        assert sq.seq_le(_end(seg), a.snd_max), (
            f"probe {seg.seq}..{_end(seg)} carries bytes beyond SND.MAX {a.snd_max}"
        )


def test_queued_data_behind_a_tail_loss_probe_is_delivered() -> None:
    """The end-to-end symptom. Less than two segments (MSS 65495) are queued; after the
    RTO (one-segment window) the go-back-N retransmission fills the gap below a probe
    taken from the end of the buffer, so the receiver ACKs beyond SND.MAX: the sender
    drops that ACK and the transfer stalls until the retry limit."""
    a, b = _pair()
    big = bytes(range(250)) * 400
    now, first, out = _probe_with_data_queued_behind_it(a, big, then_rto=True)
    wire = _Wire(a, b)
    for seg in first + out:
        b.receive_segment(seg, now)
    a.shutdown_write(now)
    wire.run(now, now + 30.0)
    assert bytes(wire.received) == b"a" * 10 + big
    assert a.bytes_in_send_buffer == 0
    assert b.eof_received
