"""An in-memory, optionally lossy link between two sans-IO TCP connections (for tests).

Time is virtual: `Link.step()` jumps to the next delivery or timer deadline, so a test of
seconds of TCP time runs in milliseconds and every deadline is exact. `Peer` is a tiny
application on each side (bulk sender, collector of what arrives, event log).

Faults (`LinkFaults`): random drop, duplication, extra delay (reordering) and jitter, and
optionally a FIFO bottleneck (`rate` bytes/s behind a `queue_limit`-segment tail-drop
queue) to exercise congestion control. Everything draws from one seeded `random.Random`,
so a failing case replays exactly. Segments due at the same instant are delivered as a
batch before either side's output is collected, as the trio layer does.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections.abc import Callable

from norouter_trio.tcp.connection import TCPConfig, TCPConnection
from norouter_trio.tcp.events import ConnectionClosed, Event
from norouter_trio.tcp.packets import ACK, RST, SYN, Segment

A_ADDR = ("127.0.42.1", 40000)
B_ADDR = ("127.0.42.2", 80)


@dataclasses.dataclass
class LinkFaults:
    """Per-segment fault probabilities and delay bounds (seconds)."""

    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0  # probability of an extra delay that lets later segments pass
    delay: float = 0.001
    jitter: float = 0.0
    rate: float = 0.0  # bytes/s of a bottleneck per direction (0: unlimited)
    queue_limit: int = 0  # tail-drop beyond this many segments queued per direction


class Peer:
    """Application on one end: sends `to_send`, then shuts down; collects what arrives."""

    def __init__(self, name: str, to_send: bytes = b"", *, chunk: int = 1 << 20) -> None:
        self.name = name
        self.conn: TCPConnection | None = None
        self.to_send = memoryview(to_send)
        self.sent = 0
        self.chunk = chunk
        self.received = bytearray()
        self.events: list[Event] = []
        self.shutdown_when_sent = True
        self.read_enabled = True
        self.closed: ConnectionClosed | None = None

    def service(self, now: float) -> None:
        conn = self.conn
        if conn is None:
            return
        while (ev := conn.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, ConnectionClosed):
                self.closed = ev
        if self.closed is not None:
            return
        if self.read_enabled:
            while conn.readable_bytes:
                self.received += conn.read(1 << 20, now)
        if conn.state.value in ("SYN-SENT", "SYN-RECEIVED", "ESTABLISHED", "CLOSE-WAIT"):
            while self.sent < len(self.to_send):
                n = conn.send(self.to_send[self.sent : self.sent + self.chunk], now)
                if n == 0:
                    break
                self.sent += n
            if self.sent == len(self.to_send) and self.shutdown_when_sent:
                conn.shutdown_write(now)


class Link:
    """Carries segments between `a` and `b` with delay, loss, duplication, reordering."""

    def __init__(
        self,
        a: Peer,
        b: Peer,
        *,
        faults: LinkFaults | None = None,
        rng: random.Random | None = None,
        config_b: TCPConfig | None = None,
        isn_b: int | None = None,
        now: float = 0.0,
    ) -> None:
        self.a = a
        self.b = b
        self.faults = faults or LinkFaults()
        self.rng = rng or random.Random(0)
        self.now = now
        self.config_b = config_b or TCPConfig()
        self.isn_b = isn_b
        self._queue: list[tuple[float, int, str, Segment]] = []
        self._counter = 0
        self.log: list[tuple[float, str, Segment]] = []  # every segment put on the link
        self.filter: Callable[[str, Segment], bool] | None = None  # False = drop it
        self.delivered = 0
        self.tail_drops = 0
        self._busy_until = {"a->b": 0.0, "b->a": 0.0}
        self._queued: dict[str, list[float]] = {"a->b": [], "b->a": []}

    def _schedule(self, direction: str, seg: Segment) -> None:
        f = self.faults
        rng = self.rng
        self.log.append((self.now, direction, seg))
        if self.filter is not None and not self.filter(direction, seg):
            return
        if f.drop and rng.random() < f.drop:
            return
        start = self.now
        if f.rate:
            # A bottleneck: segments leave one after another at `rate`, behind a queue.
            queued = [t for t in self._queued[direction] if t > self.now]
            if f.queue_limit and len(queued) >= f.queue_limit:
                self.tail_drops += 1
                self._queued[direction] = queued
                return
            start = max(self.now, self._busy_until[direction]) + (len(seg.payload) + 40) / f.rate
            self._busy_until[direction] = start
            queued.append(start)
            self._queued[direction] = queued
        copies = 2 if f.dup and rng.random() < f.dup else 1
        for _ in range(copies):
            delay = f.delay + (rng.random() * f.jitter if f.jitter else 0.0)
            if f.reorder and rng.random() < f.reorder:
                delay += f.delay * 3 + rng.random() * 0.01
            self._counter += 1
            heapq.heappush(
                self._queue, (start + delay, self._counter, direction, dataclasses.replace(seg))
            )

    def flush(self) -> None:
        """Let both applications act, then move every segment they produced onto the link."""
        for _ in range(100):
            moved = False
            for peer, direction in ((self.a, "a->b"), (self.b, "b->a")):
                peer.service(self.now)
                if peer.conn is not None:
                    for seg in peer.conn.segments_to_send(self.now):
                        self._schedule(direction, seg)
                        moved = True
            if not moved:
                return

    def inject(self, direction: str, seg: Segment) -> None:
        """Deliver a hand-made segment now (e.g. a blind RST)."""
        self._deliver(direction, seg)
        self.flush()

    def _deliver(self, direction: str, seg: Segment) -> None:
        self.delivered += 1
        if direction == "a->b":
            if self.b.conn is None:
                if seg.flags & SYN and not seg.flags & (ACK | RST):
                    self.b.conn = TCPConnection.accept(
                        B_ADDR, A_ADDR, seg, self.now, self.config_b, self.isn_b
                    )
                return
            self.b.conn.receive_segment(seg, self.now)
        else:
            assert self.a.conn is not None
            self.a.conn.receive_segment(seg, self.now)

    def next_time(self) -> float | None:
        times = [self._queue[0][0]] if self._queue else []
        for peer in (self.a, self.b):
            if peer.conn is not None and (t := peer.conn.get_timer()) is not None:
                times.append(t)
        return min(times) if times else None

    def step(self) -> bool:
        """Advance to the next delivery or deadline and process it; False when idle."""
        self.flush()
        t = self.next_time()
        if t is None:
            return False
        self.now = max(self.now, t)
        while self._queue and self._queue[0][0] <= self.now:
            _, _, direction, seg = heapq.heappop(self._queue)
            self._deliver(direction, seg)
        for peer in (self.a, self.b):
            conn = peer.conn
            if conn is not None and (d := conn.get_timer()) is not None and d <= self.now:
                conn.handle_timer(self.now)
        self.flush()
        return True

    def run(
        self,
        until: Callable[[], bool] | None = None,
        *,
        max_steps: int = 200_000,
        max_time: float = 3600.0,
    ) -> None:
        """Step until `until()` holds (or, without it, until idle); bounded in steps/time."""
        for _ in range(max_steps):
            if until is not None and until():
                return
            if self.now > max_time or not self.step():
                break
        if until is not None and not until():
            raise AssertionError(
                f"link did not reach the condition: now={self.now:.3f} a={self.a.conn!r} "
                f"b={self.b.conn!r}"
            )


def connected_pair(
    a_data: bytes = b"",
    b_data: bytes = b"",
    *,
    config_a: TCPConfig | None = None,
    config_b: TCPConfig | None = None,
    isn_a: int | None = None,
    isn_b: int | None = None,
    faults: LinkFaults | None = None,
    rng: random.Random | None = None,
) -> Link:
    """A connects to B (B accepts on its first SYN); nothing has been exchanged yet."""
    a = Peer("a", a_data)
    b = Peer("b", b_data)
    link = Link(a, b, faults=faults, rng=rng, config_b=config_b, isn_b=isn_b)
    a.conn = TCPConnection.connect(A_ADDR, B_ADDR, link.now, config_a or TCPConfig(), isn_a)
    return link
