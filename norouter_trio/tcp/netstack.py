"""trio layer over the sans-IO stack: `NetStack`, `TCPStream`, `TCPListener`.

Shape: `NetStack.run` owns one nursery with
- the *reader* (the body of `run`): takes L3 packets from the inbound channel, a batch at a
  time without yielding between them, feeds them to `TCPStack` synchronously, then puts
  the output of the connections they touched into the outbound channel itself
  (`send_nowait`: one ACK per connection per batch, no hand-off to another task);
- output of application calls (`send_all`, a read that opens the window, `aclose`) goes
  out at once, in the caller's task; except for a connection whose reader was just woken
  by input: its output (the ACK, mostly) is *held* until that task has run, so the reply,
  the request after `connect` or the FIN after EOF carries the ACK (one segment instead
  of two; never a timer). The woken task sends it itself with its first send, FIN or
  close (a read's window update stays held); if it does none, the writer does: the task
  wakes it when it resumes, so the writer runs in the next scheduling pass, after the
  rest of that task's step;
- the *writer*: flushes held output the woken task did not send, big writes (see
  `send_all`), and drains the *backlog*: packets the outbound channel had no room for,
  awaiting room. It is the only place output waits; while the backlog is not empty
  nothing else is added (order kept, at most one connection's output pending there), the
  other connections keep theirs in the core;
- the *timer* task: one for the whole stack, sleeping until the earliest of the cores'
  `get_timer()` deadlines, kept in a heap (one live entry per connection; no polling, no
  task per connection or packet). A deadline that moves later leaves its entry in place
  and is re-queued when that entry comes due, so the common RTO re-arm on every ACK costs
  no heap work; one that moves earlier pushes a new entry (the old one goes stale). The
  reader, too, runs the timers due when it ends a batch (one comparison when none is):
  under load a deadline often passes while it runs anyway, and the timer task then need
  not wake for it;
- one task per SYN offered to the accept-any (bastion) handler, running that handler.

Channel "full" behaviour (what we chose, and why it is safe):
- inbound full: the stdio reader feeding us waits. That is backpressure, never loss; the
  peers' TCP windows bound how much can be in flight, so it cannot deadlock: our reader
  never waits on the outbound channel.
- outbound full: the writer waits (the rest stays in the backlog or, for the other
  connections, in the core). Connections keep unsent data in their send buffers
  (bounded by `TCPConfig.send_buffer`); `send_all` waits for room; timers still fire.
  So a timer can run a connection (`handle_timer`) holding data queued by `send()` that
  no output has seen yet: the core must treat it as unsent (a tail loss probe taken from
  it once put bytes beyond SND.MAX on the wire and stalled the connection for good).
- a slow application reader: the receive buffer fills, the advertised window closes, the
  peer stops. Nothing grows without bound.

Diagnostics: a connection whose data in flight stays unacknowledged for
`STALL_REPORT_AFTER` seconds is logged once as a warning with its TCP state (sequence
numbers, windows, buffers, timers, parked tasks); `NetStack.log_report()` logs every
connection that way (the agent can call it on SIGUSR1 via `NetStack.running()`).

Closing: `aclose()` (also what `async with stream` does when its scope is cancelled) is
*graceful*: FIN after the queued data, as `shutdown(SHUT_WR)` + `close()` on a socket. If
unread data is waiting or arrives later, the core resets instead (RFC 1122 §4.2.2.13).
`stream.abort()` sends RST at once. Errors are translated like trio's SocketStream:
`BrokenResourceError` on reset / timeout, `ClosedResourceError` after our own close,
`ConnectionRefusedError` / `TimeoutError` (both OSError, naming the address) from
`connect`.
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import operator
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import ClassVar

import trio
from trio.lowlevel import (
    Abort,
    ParkingLot,
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from norouter_trio.tcp import checksum
from norouter_trio.tcp.connection import TCPConfig, TCPStateError
from norouter_trio.tcp.events import (
    CloseReason,
    ConnectionClosed,
    ConnectionReset,
    DataAvailable,
    EOFReceived,
    Established,
    Writable,
)
from norouter_trio.tcp.stack import (
    Address,
    Conn,
    Delivered,
    Key,
    NewConnection,
    NewPending,
    PendingSyn,
    TCPStack,
)
from norouter_trio.tcp.state import TCPState

log = logging.getLogger(__name__)

DEFAULT_RECEIVE_SIZE = 65536
#: Data in flight unacknowledged this long (no progress between two checks this far
#: apart) gets the connection's state logged; see `NetStack._stall_watch`.
STALL_REPORT_AFTER = 10.0
READ_BATCH = 64  # inbound packets handled per scheduling slice
#: Connection timers fired per scheduling slice. TIME-WAIT ends fall on a grid (see
#: TIME_WAIT_GRID), so at hundreds of connections a second a hundred or more come due
#: at once: in one slice (~12 us each) they held every other connection up for a
#: millisecond or more, a latency spike every grid step.
TIMER_BATCH = 32
#: TIME-WAIT ends are rounded up to a multiple of this (seconds): one timer wake-up per
#: step for every connection ending then (see `NetStack._set_deadline`).
TIME_WAIT_GRID = 0.25
_TIME_WAIT = TCPState.TIME_WAIT
_FIN_WAIT_2 = TCPState.FIN_WAIT_2
#: send_all() calls this big leave their output to the writer task (see send_all);
#: smaller ones (requests, replies, keystrokes) are sent at once.
DEFER_WRITES_FROM = 16 * 1024
# How an application call left its connection (see NetStack._after).
_SEND = 0  # output now (held output too)
_READ = 1  # a read: its window update leaves with held output, if any
_DEFER = 2  # a big write: the writer flushes it

__all__ = ["NetStack", "PendingConnection", "TCPListener", "TCPStream"]


class _State:
    """What the trio layer tracks per connection (hung on `Conn.owner`)."""

    __slots__ = (
        "close_reason",
        "conn",
        "deadline",
        "eof",
        "eof_sent",
        "established",
        "finished",
        "held",
        "listener",
        "local_closed",
        "queued",
        "reader",
        "receiving",
        "reset",
        "sending",
        "writer",
    )

    def __init__(self, conn: Conn, listener: TCPListener | None) -> None:
        self.conn = conn
        self.listener = listener
        # The one task waiting to read (or for connect/accept), and the one waiting for
        # send-buffer room: `receiving` / `sending` allow no second one (a ParkingLot
        # per connection cost more than the rest of setting it up).
        self.reader: trio.lowlevel.Task | None = None
        self.writer: trio.lowlevel.Task | None = None
        self.deadline = math.inf  # the core's get_timer() as the writer last saw it
        self.queued = math.inf  # the deadline of this connection's live timer-heap entry
        self.established = False
        self.eof = False
        self.eof_sent = False
        self.reset = False
        self.finished = False
        self.held = False  # output held for the woken reader's reply; see NetStack._after
        self.local_closed = False
        self.close_reason: CloseReason | None = None
        self.receiving = False
        self.sending = False

    def wake_all(self) -> None:
        self.wake_reader()
        self.wake_writer()

    def wake_reader(self) -> None:
        task = self.reader
        if task is not None:
            self.reader = None
            reschedule(task)

    def wake_writer(self) -> None:
        task = self.writer
        if task is not None:
            self.writer = None
            reschedule(task)

    async def wait_reader(self, ns: NetStack) -> None:
        """Park the reading (or connecting) task until `wake_reader`; a checkpoint. Woken
        with its connection's output held (see `NetStack._after`), the task has the
        writer send it in the next scheduling pass, after this step, unless it sends first
        itself (the writer then finds nothing to do)."""
        try:
            await self._park("reader")
        finally:
            if self.held:
                ns._held_due(self)

    async def wait_writer(self) -> None:
        """Park the sending task until `wake_writer`; a checkpoint."""
        await self._park("writer")

    async def _park(self, slot: str) -> None:
        """Park the current task in `slot` ("reader" or "writer") until its wake call
        clears the slot; a cancelled wait clears it too."""
        task = current_task()
        setattr(self, slot, task)

        def abort(_: object) -> Abort:
            if getattr(self, slot) is task:
                setattr(self, slot, None)
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    def describe(self) -> str:
        (lip, lport), (rip, rport) = self.conn.local, self.conn.remote
        return f"{lip}:{lport} <-> {rip}:{rport}"


def _rel(deadline: float | None, now: float) -> str:
    if deadline is None or deadline == math.inf:
        return "-"
    return f"{deadline - now:+.3f}s"


def describe_connection(conn: Conn, st: _State | None, now: float) -> str:
    """A connection's state in one line (for stall reports; reads core internals)."""
    tcp = conn.tcp
    g = getattr
    una, nxt, smax = tcp.snd_una, tcp.snd_nxt, tcp.snd_max
    rcv_nxt = tcp.rcv_nxt
    rcv_wnd = (g(tcp, "_rcv_adv", rcv_nxt) - rcv_nxt) & 0xFFFFFFFF
    cc = g(tcp, "_cc", None)
    parts = [
        f"{conn.key[0]}:{conn.key[1]}<->{conn.key[2]}:{conn.key[3]} {tcp.state.value}",
        f"snd.una={una} nxt=+{(nxt - una) & 0xFFFFFFFF} max=+{(smax - una) & 0xFFFFFFFF}",
        f"snd.wnd={tcp.snd_wnd} cwnd={g(cc, 'cwnd', '?')} recovery={g(cc, 'in_recovery', '?')}",
        f"rcv.nxt={rcv_nxt} rcv.wnd={rcv_wnd}",
        f"sendq={tcp.bytes_in_send_buffer} recvq={tcp.readable_bytes}",
        f"ooo={len(g(tcp, '_ooo', ()))} rexmit_budget={g(tcp, '_rexmit_budget', '?')}",
        f"retries={g(tcp, '_retries', '?')} ack_now={g(tcp, '_ack_now', '?')}",
        f"timer={_rel(tcp.get_timer(), now)} rto={_rel(g(tcp, '_rto_deadline', None), now)}"
        f" persist={_rel(g(tcp, '_persist_deadline', None), now)}"
        f" delack={_rel(g(tcp, '_delack_deadline', None), now)}"
        f" pto={_rel(g(tcp, '_pto_deadline', None), now)}",
    ]
    if st is not None:
        parts.append(
            f"armed={_rel(st.deadline, now)} queued={_rel(st.queued, now)}"
            f" readers={int(st.reader is not None)} writers={int(st.writer is not None)}"
            f" eof={st.eof} eof_sent={st.eof_sent} closed={st.local_closed}"
        )
    return " ".join(parts)


class NetStack:
    """The agent's user-space TCP/IPv4 stack, driven by bounded channels of L3 packets."""

    _running: ClassVar[weakref.WeakSet[NetStack]] = weakref.WeakSet()

    @classmethod
    def running(cls) -> list[NetStack]:
        """The stacks whose `run()` is active in this process (for a SIGUSR1 report)."""
        return list(cls._running)

    def __init__(
        self,
        vip: str,
        outbound: trio.MemorySendChannel[bytes],
        *,
        verify_checksums: bool = True,
        config: TCPConfig | None = None,
    ) -> None:
        self.vip = vip
        self._outbound = outbound
        self._stack = TCPStack(vip, config=config, verify_checksums=verify_checksums)
        self._nursery: trio.Nursery | None = None
        self._dirty: dict[_State, None] = {}
        self._backlog: deque[bytes] = deque()  # output the channel had no room for
        # Held output whose woken task has run (or is running): the writer sends it.
        self._due: dict[_State, None] = {}
        #: The run's clock (`trio.current_time()` without its two wrapper calls).
        self._now: Callable[[], float] = trio.current_time
        self._writer_task: trio.lowlevel.Task | None = None  # set while the writer waits
        self._batching = False  # the reader or timer runs: it flushes when done
        self._timers: list[tuple[float, int, _State]] = []  # heap; see _timer_loop
        self._timer_seq = 0  # tie-breaker: _State does not order
        self._timer_next = math.inf  # what the timer task sleeps until
        self._timer_scope: trio.CancelScope | None = None
        self._listeners: dict[Address, TCPListener] = {}
        self._handler: Callable[[PendingConnection], Awaitable[None]] | None = None
        self._stopped = False
        checksum.warm_up()  # a lazy numpy import would stall the first big transfer

    @property
    def counters(self) -> dict[str, int]:
        """Live counters (segments/bytes in and out, RSTs, drops by reason, ...)."""
        return self._stack.counters

    def snapshot(self) -> dict[str, int]:
        """Counters plus gauges (connections, listeners, pending SYNs) for logs."""
        return self._stack.snapshot()

    def connection_report(self) -> list[str]:
        """One line per connection: TCP state, sequence space, windows, buffers, timers and
        parked tasks, so a stalled transfer shows which side waits for what."""
        now = trio.current_time()
        lines = []
        for conn in list(self._stack.connections.values()):
            st = conn.owner
            lines.append(describe_connection(conn, st if isinstance(st, _State) else None, now))
        return lines

    def log_report(self, why: str, level: int = logging.WARNING) -> None:
        """Log the counters and `connection_report()` (one line each), e.g. on SIGUSR1."""
        log.log(level, "%s: stack report (%s): %s", self.vip, why, self.snapshot())
        for line in self.connection_report():
            log.log(level, "%s:   %s", self.vip, line)

    @property
    def stack(self) -> TCPStack:
        """The sans-IO stack underneath (for debug views and tests)."""
        return self._stack

    # ---- running -------------------------------------------------------------------------

    async def run(
        self,
        inbound: trio.MemoryReceiveChannel[bytes],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Process packets until `inbound` ends; then every connection is broken."""
        if self._nursery is not None or self._stopped:
            raise RuntimeError(f"NetStack for {self.vip} can only run once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._now = trio.lowlevel.current_clock().current_time
                NetStack._running.add(self)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._stall_watch)
                task_status.started()
                await self._reader(inbound)
                log.debug("%s: inbound packets ended; stopping the stack", self.vip)
                nursery.cancel_scope.cancel()
        finally:
            NetStack._running.discard(self)
            self._nursery = None
            self._stopped = True
            self._break_everything()

    async def _stall_watch(self) -> None:
        """Report connections whose data in flight stays unacknowledged (the RTO keeps
        firing) with their full TCP state: the first report is a warning, later ones
        are debug. A stall then explains itself in the log instead of as a timeout."""
        last: dict[Key, tuple[int, int]] = {}
        reported: set[Key] = set()
        while True:
            await trio.sleep(STALL_REPORT_AFTER)
            now = trio.current_time()
            seen: dict[Key, tuple[int, int]] = {}
            for key, conn in list(self._stack.connections.items()):
                tcp = conn.tcp
                progress = (tcp.snd_una, tcp.rcv_nxt)
                seen[key] = progress
                if tcp.snd_una == tcp.snd_max or last.get(key) != progress:
                    reported.discard(key)
                    continue
                level = logging.DEBUG if key in reported else logging.WARNING
                if log.isEnabledFor(level):
                    st = conn.owner
                    log.log(
                        level,
                        "%s: no acknowledgement for at least %.0f s: %s",
                        self.vip,
                        STALL_REPORT_AFTER,
                        describe_connection(conn, st if isinstance(st, _State) else None, now),
                    )
                reported.add(key)
            last = seen
            reported &= seen.keys()

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError(f"NetStack for {self.vip} is not running (start run() first)")
        return self._nursery

    def _break_everything(self) -> None:
        for conn in list(self._stack.connections.values()):
            st = conn.owner
            if isinstance(st, _State) and not st.finished:
                st.finished = True
                st.reset = True
                st.wake_all()
        for listener in list(self._listeners.values()):
            listener._closed = True
            listener._lot.unpark_all()

    async def _reader(self, inbound: trio.MemoryReceiveChannel[bytes]) -> None:
        """Feed a batch of packets to the stack, then put its output in the outbound
        channel at once, in this task: no hand-off to the writer (a scheduling pass per
        batch), and one batch of input gives one ACK per connection, not one per packet."""
        receive_nowait = inbound.receive_nowait
        receive_packet = self._stack.receive_packet
        take_output = self._stack.take_output
        backlog = self._backlog
        timers = self._timers
        after = self._after
        on_other = self._on_other
        flush = self._flush
        clock = self._now
        async for packet in inbound:
            now = clock()
            self._batching = True
            try:
                left = READ_BATCH
                while True:
                    outcome = receive_packet(packet, now)
                    if type(outcome) is Delivered:
                        st = outcome.conn.owner
                        if st is not None:
                            after(st, now)
                    elif outcome is not None:
                        on_other(outcome, now)
                    left -= 1
                    if not left:
                        break
                    try:
                        packet = receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if timers and timers[0][0] <= now:
                    self._fire_timers(now)
            finally:
                self._batching = False
            if not backlog:  # (else they wait in the stack, as connections' output)
                packets = take_output()  # the stack's own RSTs and echo replies first
                if packets:
                    self._put(packets)
            flush(now)
            if self._timer_scope is not None:
                self._retime()

    def _on_other(self, outcome: Delivered | NewConnection | NewPending, now: float) -> None:
        """A SYN for a listener (a new connection) or for the accept-any handler (the
        reader handles `Delivered` itself)."""
        if isinstance(outcome, NewConnection):
            listener = self._listeners.get(outcome.listener)
            if listener is None or listener._closed or listener._full():
                self._stack.forget(outcome.conn)  # no SYN-ACK: the peer retries its SYN
                self._stack.counters["listen_overflow"] += 1
                return
            listener._half_open += 1
            self._after(self._new_state(outcome.conn, listener), now)
        elif isinstance(outcome, NewPending):
            handler = self._handler
            if handler is None or self._nursery is None:
                self._stack.refuse_pending(outcome.pending.key)
            else:
                self._nursery.start_soon(
                    self._run_handler, handler, PendingConnection(self, outcome.pending)
                )

    # ---- per-connection plumbing -------------------------------------------------------

    def _new_state(self, conn: Conn, listener: TCPListener | None = None) -> _State:
        st = _State(conn, listener)
        conn.owner = st
        self._require_running()
        return st

    def _after(self, st: _State, now: float, how: int = _SEND) -> None:
        """After any call into a connection: dispatch its events, move its timer, send its
        output. `how`: _SEND (an application call that sends: flush now, held output
        too), _READ (a read's window update: stays held if output is held) or _DEFER (a
        big write: the writer flushes it, see `send_all`)."""
        tcp = st.conn.tcp
        woke = False  # a reader (or connect) waiter: it may answer at once
        ev = tcp.next_event()
        while ev is not None:
            kind = type(ev)
            if kind is DataAvailable:
                if st.reader is not None:
                    st.wake_reader()
                    woke = True
            elif kind is Writable:
                if st.writer is not None:
                    st.wake_writer()
            elif kind is EOFReceived:
                st.eof = True
                if st.reader is not None:
                    st.wake_reader()
                    woke = True
            elif kind is Established:
                st.established = True
                if st.reader is not None:
                    st.wake_reader()
                    woke = True
                if st.listener is not None:
                    st.listener._on_established(st)
            elif kind is ConnectionReset:
                st.reset = True
                st.wake_all()
            elif isinstance(ev, ConnectionClosed):
                self._on_closed(st, ev.reason)
            ev = tcp.next_event()
        if st.writer is not None and tcp.send_buffer_free:
            # Writable only follows a send() that was cut short; a buffer filled exactly
            # leaves wait_send_all_might_not_block() waiting, so wake it on any room.
            st.wake_writer()
        if self._batching:
            # Input (or a timer): the reader (timer task) flushes after its batch.
            if st.finished:
                self._dirty[st] = None
            elif st.held:
                pass  # more input for a held connection: its output leaves with the rest
            elif woke and not st.eof_sent and not tcp.bytes_in_send_buffer:
                # Input woke this connection's reader: hold its output (an ACK, mostly)
                # until that task has run, so what it sends in answer (a request after
                # connect, a reply, the FIN after EOF) carries the ACK: one segment
                # instead of two. It sends it itself with that answer; else the writer,
                # woken when the task resumes (wait_reader), does a pass later; never a
                # timer. (Not when data is queued already, e.g. connect's initial_data:
                # the ACK rides on that. Nor when the core has nothing to send now, e.g.
                # it delays the ACK of a lone segment itself, or when our FIN is sent
                # already, so nothing more can carry it: no writer pass then.)
                if tcp.control_pending:
                    st.held = True
                else:
                    self._dirty[st] = None
            else:
                self._dirty[st] = None
            return
        if st.held:
            if how == _READ and not st.finished:
                return  # a window update: it leaves with the held ACK
            st.held = False  # sent now (the writer's entry, if any, goes stale)
        self._dirty[st] = None
        if how == _DEFER or self._nursery is None:
            self._kick()
        else:
            self._flush(now)
            if self._timer_scope is not None:
                # The call may have ended the deadline the timer task sleeps until (a
                # reply carries the ACK a delayed-ACK timer waited for): else it would
                # wake for nothing, a scheduling pass per request/response connection.
                self._retime()

    def _held_due(self, st: _State) -> None:
        """The task woken with `st`'s output held runs: have the writer send it after this
        step (a no-op then if the task sent it itself meanwhile)."""
        self._due[st] = None
        self._kick()

    def _on_closed(self, st: _State, reason: CloseReason) -> None:
        st.finished = True
        st.close_reason = reason
        if reason is not CloseReason.NORMAL:
            st.reset = True
        self._stack.forget(st.conn)
        self._stack.counters["retransmits"] += int(getattr(st.conn.tcp, "retransmits", 0))
        if st.listener is not None and not st.established:
            st.listener._half_open -= 1
        if st.reader is not None or st.writer is not None:
            st.wake_all()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: connection %s closed (%s)", self.vip, st.describe(), reason.value)

    def _set_deadline(self, st: _State, deadline: float, now: float) -> None:
        """Record the core's new deadline; queue it only if it is earlier than the
        connection's live heap entry (a later one is re-queued when that entry fires).
        TIME-WAIT (and FIN-WAIT-2 give-up) ends are rounded up to a TIME_WAIT_GRID step:
        at hundreds of connections a second the timer then wakes once per step for all of
        them, not once per connection (ending TIME-WAIT a little late is harmless)."""
        state = st.conn.tcp.state
        if deadline != math.inf and (state is _TIME_WAIT or (
            # FIN-WAIT-2's give-up timer (the same length); not its delayed ACK
            state is _FIN_WAIT_2 and deadline - now > TIME_WAIT_GRID
        )):
            deadline = math.ceil(deadline / TIME_WAIT_GRID) * TIME_WAIT_GRID
        st.deadline = deadline
        if deadline < st.queued:
            st.queued = deadline
            self._timer_seq += 1
            heapq.heappush(self._timers, (deadline, self._timer_seq, st))
            if deadline < self._timer_next:
                self._timer_next = deadline
                scope = self._timer_scope
                if scope is not None:
                    scope.deadline = deadline

    async def _timer_loop(self) -> None:
        """Fire due connection timers; sleep until the earliest deadline in the heap."""
        heap = self._timers
        clock = self._now
        while True:
            now = clock()
            self._batching = True
            try:
                fired = self._fire_timers(now)
            finally:
                self._batching = False
            if fired:
                self._flush(now)
            if len(heap) > 64 and len(heap) > 4 * len(self._stack.connections):
                live = [e for e in heap if e[0] == e[2].queued and not e[2].finished]
                heap[:] = live
                heapq.heapify(heap)
            self._drop_stale_timers(now)
            self._timer_next = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=self._timer_next) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None

    def _fire_timers(self, now: float) -> bool:
        """Run the cores' timers due at `now` (the caller is batching, and flushes if this
        returns True: some fired). The timer task does, and the reader after a batch of
        input: under load a deadline often passes while the reader runs anyway, and the
        timer task then need not wake (a task step, a cancel scope) for it. At most
        TIMER_BATCH fire per call: the rest stay due, and the timer task, whose wake-up
        has passed, takes them in its next slice."""
        heap = self._timers
        heappop = heapq.heappop
        fired = False
        left = TIMER_BATCH
        while heap and heap[0][0] <= now and left:
            when, _, st = heappop(heap)
            if when != st.queued or st.finished:
                continue  # superseded by an earlier entry, or the connection ended
            st.queued = math.inf
            tcp = st.conn.tcp
            deadline = tcp.get_timer()
            if deadline is None:
                st.deadline = math.inf
            elif deadline <= now:
                st.deadline = math.inf  # _flush re-arms from get_timer()
                tcp.handle_timer(now)
                self._after(st, now)
                fired = True
                left -= 1
            else:
                self._set_deadline(st, deadline, now)  # moved later since queued
        return fired

    def _drop_stale_timers(self, now: float) -> None:
        """Before sleeping: pop heap-top entries of ended connections and entries whose
        deadline moved later or went away (re-queued at the new one), so the loop does not
        wake for them. Short connections end long before their RTO: without this the loop
        woke once or more per connection, a scheduling pass each, for nothing."""
        heap = self._timers
        heappop = heapq.heappop
        while heap:
            when, _, st = heap[0]
            if when != st.queued or st.finished:
                heappop(heap)
                continue
            deadline = st.conn.tcp.get_timer()
            if deadline is not None and deadline <= when:
                return  # a live entry: sleep until it
            heappop(heap)
            st.queued = math.inf
            if deadline is None:
                st.deadline = math.inf
            else:
                self._set_deadline(st, deadline, now)

    def _retime(self) -> None:
        """After a batch of input or an application call: if it stopped the timer the
        loop sleeps until (an ACK ends the loss probe a few ms after it was armed, a reply
        carries the ACK a delayed-ACK timer waited for, the connection ended) or fired it
        (`_fire_timers`), move the loop's wake-up later, to the next live deadline; else
        it would wake for nothing, a scheduling pass per request/response connection."""
        heap = self._timers
        if not heap:
            nxt = math.inf
        else:
            when, _, st = heap[0]
            if when == st.queued and not st.finished and st.deadline <= when:
                nxt = when  # the common case: the earliest entry is live
            else:
                self._drop_stale_timers(self._now())
                nxt = heap[0][0] if heap else math.inf
        scope = self._timer_scope
        if nxt > self._timer_next and scope is not None:
            self._timer_next = nxt
            scope.deadline = nxt

    def _kick(self) -> None:
        """Wake the writer (if it waits): held output, big writes and the backlog are
        flushed there, a scheduling pass later on purpose (see `_after`, `send_all`)."""
        task = self._writer_task
        if task is not None:
            self._writer_task = None
            trio.lowlevel.reschedule(task)

    def _flush(self, now: float) -> None:
        """Move the dirty connections' output into the outbound channel without waiting
        (the stack's own packets go through `_put`, by the reader and the writer).

        When the channel is full the rest goes to the backlog, which only the writer
        drains (awaiting room); while it is not empty nothing else is added, so packets
        stay in order and the backlog holds one connection's output at most; the other
        connections keep theirs in the core until then."""
        backlog = self._backlog
        if backlog:
            return
        output = self._stack.output
        send_nowait = self._outbound.send_nowait
        try:
            while self._dirty and not backlog:
                dirty, self._dirty = self._dirty, {}
                pending = iter(dirty)
                for st in pending:
                    conn = st.conn
                    packets = output(conn, now)
                    # Output arms timers (RTO, delayed ACK gone): move the deadline.
                    if not st.finished:
                        deadline = conn.tcp.get_timer()
                        if deadline is None:
                            deadline = math.inf
                        if deadline != st.deadline:
                            self._set_deadline(st, deadline, now)
                    if not packets:
                        continue
                    i = 0
                    try:
                        for packet in packets:
                            send_nowait(packet)
                            i += 1
                    except trio.WouldBlock:
                        backlog.extend(packets[i:])
                        for rest in pending:  # their turn comes after the backlog
                            self._dirty[rest] = None
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._outbound_gone()
            return
        if backlog:
            self._kick()

    def _put(self, packets: list[bytes]) -> None:
        """Into the channel while it has room; then, in order, into the backlog. (For the
        stack's own packets: connections' output waits in the core while the backlog is
        not empty; see `_flush`.)"""
        backlog = self._backlog
        send_nowait = self._outbound.send_nowait
        try:
            for packet in packets:
                if backlog:
                    backlog.append(packet)
                    continue
                try:
                    send_nowait(packet)
                except trio.WouldBlock:
                    backlog.append(packet)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._outbound_gone()
            return
        if backlog:
            self._kick()

    def _outbound_gone(self) -> None:
        log.warning("%s: the outbound packet channel closed; stopping the stack", self.vip)
        self._backlog.clear()
        self._dirty.clear()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        """Flush held output its woken task did not send, and big writes; drain the
        backlog, waiting for room in the outbound channel (the only place the stack's
        output waits)."""
        backlog = self._backlog
        outbound = self._outbound
        due = self._due
        clock = self._now
        take_output = self._stack.take_output
        current_task = trio.lowlevel.current_task
        wait = trio.lowlevel.wait_task_rescheduled

        def abort(_: object) -> trio.lowlevel.Abort:
            self._writer_task = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            while True:
                if not backlog and not self._dirty and not due:
                    self._writer_task = current_task()
                    await wait(abort)
                while backlog:
                    await outbound.send(backlog[0])
                    backlog.popleft()
                if due:
                    # Their woken tasks have run (they woke us as they resumed, so we run
                    # a pass after them): what they did not send leaves now.
                    dirty = self._dirty
                    for st in due:
                        if st.held:
                            st.held = False
                            dirty[st] = None
                    due.clear()
                packets = take_output()  # e.g. the RST of PendingConnection.refuse()
                if packets:
                    self._put(packets)
                self._flush(clock())
                if self._timer_scope is not None:
                    self._retime()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._outbound_gone()

    async def _wait_established(self, st: _State) -> None:
        while not st.established:
            if st.finished:
                raise self._open_error(st)
            await st.wait_reader(self)

    def _open_error(self, st: _State) -> OSError:
        ip, port = st.conn.remote
        reason = st.close_reason
        if reason is CloseReason.REFUSED:
            return ConnectionRefusedError(
                errno.ECONNREFUSED, f"{ip}:{port} refused the connection (RST from the peer)"
            )
        if reason is CloseReason.TIMEOUT:
            return TimeoutError(
                errno.ETIMEDOUT, f"connecting to {ip}:{port} timed out (no answer to SYN)"
            )
        if self._stopped:
            return ConnectionAbortedError(
                errno.ECONNABORTED, f"connecting to {ip}:{port}: the network stack stopped"
            )
        return ConnectionResetError(errno.ECONNRESET, f"connection to {ip}:{port} was reset")

    # ---- public API --------------------------------------------------------------------

    async def connect(
        self,
        ip: str,
        port: int,
        *,
        src_ip: str | None = None,
        initial_data: bytes | bytearray | memoryview = b"",
        nodelay: bool = False,
    ) -> TCPStream:
        """Open a connection through the stack, from `src_ip` (default the VIP).

        `initial_data` is queued before the SYN goes out, so it rides on the ACK that
        completes the handshake (one segment instead of a pure ACK then the data; what
        does not fit the send buffer is sent once connected). `nodelay` is
        `TCPStream.set_nodelay(True)` applied before that first segment.

        Raises ConnectionRefusedError (RST), TimeoutError (no SYN-ACK) or ValueError (bad
        address). Cancelling it aborts the half-open connection.
        """
        self._require_running()
        now = self._now()
        conn = self._stack.connect(ip, port, now, src_ip=src_ip)
        st = self._new_state(conn)
        rest: memoryview | None = None
        if nodelay:
            conn.tcp.set_nodelay(True)
        if initial_data:
            view = memoryview(initial_data)
            if view.itemsize != 1:
                view = view.cast("B")
            taken = conn.tcp.send(view, now)  # SYN-SENT queues (RFC 9293 §3.10.2)
            if taken < len(view):
                rest = view[taken:]
        self._after(st, now)
        try:
            await self._wait_established(st)
        except BaseException:
            if not st.finished:
                now = self._now()
                conn.tcp.abort(now)
                self._after(st, now)
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: connected %s", self.vip, st.describe())
        stream = TCPStream(self, st)
        if rest is not None:
            try:
                await stream.send_all(rest)
            except BaseException:
                stream.abort()
                raise
        return stream

    def listen(self, ip: str, port: int, backlog: int = 128) -> TCPListener:
        """Listen on ip:port inside the stack (ip 0.0.0.0: any destination address)."""
        address = self._stack.add_listener(ip, port)
        listener = TCPListener(self, address, backlog)
        self._listeners[address] = listener
        listener._closed = self._stopped
        return listener

    def accept_any(self, handler: Callable[[PendingConnection], Awaitable[None]] | None) -> None:
        """Bastion mode: offer every SYN that no listener takes to `handler` (None: off).

        `handler` runs in its own task and must call `accept()` or `refuse()`; if it
        returns without deciding, the SYN is refused. Retransmitted SYNs are absorbed while
        it decides.
        """
        self._handler = handler
        self._stack.accept_any = handler is not None

    async def _run_handler(
        self, handler: Callable[[PendingConnection], Awaitable[None]], pending: PendingConnection
    ) -> None:
        try:
            await handler(pending)
        except Exception:
            log.exception(
                "%s: accept-any handler failed for %s:%d -> %s:%d",
                self.vip,
                *pending.remote,
                *pending.local,
            )
        finally:
            if not pending._decided:
                pending.refuse()

    def _close_listener(self, listener: TCPListener) -> None:
        if self._listeners.get(listener.address) is listener:
            del self._listeners[listener.address]
            self._stack.remove_listener(listener.address)


class PendingConnection:
    """A SYN for an address and port with no listener (bastion mode), awaiting a decision."""

    def __init__(self, netstack: NetStack, pending: PendingSyn) -> None:
        self._ns = netstack
        self._pending = pending
        self._decided = False
        self.local: Address = pending.local
        self.remote: Address = pending.remote

    async def accept(self) -> TCPStream:
        """Answer the SYN and wait for the handshake; BrokenResourceError if it fails."""
        if self._decided:
            raise RuntimeError(f"SYN from {self.remote[0]}:{self.remote[1]} already decided")
        self._decided = True
        ns = self._ns
        now = ns._now()
        conn = ns._stack.accept_pending(self._pending.key, now)
        if conn is None:
            await checkpoint()
            raise trio.BrokenResourceError(
                f"{self.remote[0]}:{self.remote[1]} gave up before the connection to "
                f"{self.local[0]}:{self.local[1]} was accepted"
            )
        st = ns._new_state(conn)
        ns._after(st, now)
        try:
            await ns._wait_established(st)
        except OSError as exc:
            raise trio.BrokenResourceError(
                f"handshake with {self.remote[0]}:{self.remote[1]} failed: {exc}"
            ) from exc
        except BaseException:
            if not st.finished:
                now = ns._now()
                conn.tcp.abort(now)
                ns._after(st, now)
            raise
        return TCPStream(ns, st)

    def refuse(self) -> None:
        """Answer the SYN with RST, as a closed port would. Idempotent."""
        if not self._decided:
            self._decided = True
            self._ns._stack.refuse_pending(self._pending.key)
            self._ns._kick()


class TCPListener(trio.abc.Listener["TCPStream"]):
    """Connections to one ip:port of the stack; `accept()` returns established streams.

    At most `backlog` connections wait (half-open plus not yet accepted); SYNs beyond that
    are dropped unanswered so the peer retries, as Linux does.
    """

    def __init__(self, netstack: NetStack, address: Address, backlog: int) -> None:
        self._ns = netstack
        self.address = address
        self._backlog = max(1, backlog)
        self._queue: deque[_State] = deque()
        self._half_open = 0
        self._lot = ParkingLot()
        self._closed = False

    def _full(self) -> bool:
        return len(self._queue) + self._half_open >= self._backlog

    def _on_established(self, st: _State) -> None:
        self._half_open -= 1
        if self._closed:
            st.conn.tcp.abort(self._ns._now())
            return
        self._queue.append(st)
        self._lot.unpark()

    async def accept(self) -> TCPStream:
        parked = False  # park() is a checkpoint: none more after it (a task step less)
        while True:
            if self._closed:
                raise trio.ClosedResourceError(
                    f"listener {self.address[0]}:{self.address[1]} is closed"
                )
            if self._queue:
                if not parked:
                    await checkpoint()
                    if not self._queue:
                        continue
                return TCPStream(self._ns, self._queue.popleft())
            await self._lot.park()
            parked = True

    async def aclose(self) -> None:
        """Stop listening; connections not yet accepted are reset."""
        if not self._closed:
            self._closed = True
            self._ns._close_listener(self)
            now = self._ns._now()
            while self._queue:
                st = self._queue.popleft()
                st.conn.tcp.abort(now)
                self._ns._after(st, now)
            self._lot.unpark_all()
        await checkpoint()


class TCPStream(trio.abc.HalfCloseableStream):
    """One TCP connection of the stack as a trio stream.

    `send_eof()` sends FIN; `aclose()` closes gracefully (FIN); `abort()` resets (RST).
    """

    def __init__(self, netstack: NetStack, st: _State) -> None:
        self._ns = netstack
        self._st = st
        self.local_address: Address = st.conn.local
        self.remote_address: Address = st.conn.remote

    def __repr__(self) -> str:
        return f"<TCPStream {self._st.describe()}>"

    def set_nodelay(self, on: bool) -> None:
        """Disable Nagle's algorithm (True) for latency-sensitive request/response use."""
        self._st.conn.tcp.set_nodelay(on)

    @property
    def segment_size(self) -> int:
        """Payload bytes of a full segment (the peer's MSS less the timestamp option; 0
        if unknown). A relay writing in multiples of it sends no runt segment after each
        chunk, which with Nagle off would go out alone."""
        tcp = self._st.conn.tcp
        n = int(getattr(tcp, "_smss", 0)) - (12 if getattr(tcp, "_ts_ok", False) else 0)
        return max(n, 0)

    def _broken(self) -> trio.BrokenResourceError:
        st = self._st
        ip, port = st.conn.remote
        if st.close_reason is CloseReason.TIMEOUT:
            why = "timed out (no acknowledgement)"
        elif self._ns._stopped:
            why = "lost: the network stack stopped"
        else:
            why = "was reset"
        return trio.BrokenResourceError(f"connection to {ip}:{port} {why}")

    def _check_send(self) -> None:
        st = self._st
        if st.local_closed:
            raise trio.ClosedResourceError("this stream was closed")
        if st.eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        if st.reset or st.finished:
            raise self._broken()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        st = self._st
        if st.sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        st.sending = True
        # As trio's SocketStream: a cancel point, the work, then a shielded schedule
        # point (unless it parked). So what the caller does next without yielding (a
        # send_eof() after the last data) is queued before the writer flushes, and
        # leaves in the same segment.
        parked = False
        try:
            await checkpoint_if_cancelled()
            self._check_send()
            total = len(data)
            if not total:
                return
            view = memoryview(data)
            if view.itemsize != 1:
                view = view.cast("B")
            tcp = st.conn.tcp
            ns = self._ns
            clock = ns._now
            # A big write (a relay's chunk) is flushed by the writer a pass later: the
            # next chunk may join it first, so the end of this one fills a segment
            # instead of leaving alone as a runt (autocorking).
            how = _DEFER if total >= DEFER_WRITES_FROM else _SEND
            offset = 0
            while True:
                now = clock()
                try:
                    taken = tcp.send(view[offset:] if offset else view, now)
                except TCPStateError:
                    raise self._broken() from None
                if taken:
                    offset += taken
                    ns._after(st, now, how)
                    if offset >= total:
                        return
                parked = True
                await st.wait_writer()
                self._check_send()
        finally:
            st.sending = False
            if not parked:
                await cancel_shielded_checkpoint()

    def try_send_last(self, data: bytes | bytearray | memoryview) -> bool:
        """`send_last(data)` (b"": `send_eof()`) done at once without a schedule point,
        when the send buffer takes all of `data`; False (nothing done) otherwise. For a
        relay whose task ends or waits right after: a task step less per connection."""
        st = self._st
        if st.sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if st.eof_sent and not data and not st.local_closed:
            return True  # send_eof() twice is allowed
        tcp = st.conn.tcp
        if (
            len(data) > tcp.send_buffer_free
            or st.local_closed or st.eof_sent or st.reset or st.finished
        ):
            return False  # the awaited call waits, or raises the right error
        try:
            now = self._ns._now()
            if data:
                tcp.send(data, now)
            st.eof_sent = True
            tcp.shutdown_write(now)
        except TCPStateError:
            raise self._broken() from None
        self._ns._after(st, now)
        return True

    def receive_now(self, max_bytes: int) -> bytes | None:
        """What `receive_some` would return at once (data, or b"" at EOF), without its
        schedule point; None when it would have to wait. For a relay, which then awaits
        `receive_some` (that parks: no extra task step per chunk)."""
        st = self._st
        if st.receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if st.local_closed:
            raise trio.ClosedResourceError("this stream was closed")
        if not st.reset:
            ns = self._ns
            now = ns._now()
            data = st.conn.tcp.read(max_bytes, now)
            if data or st.eof:
                if data and not st.finished:
                    ns._after(st, now, _READ)
                return data
        if st.reset or st.finished:
            raise self._broken()
        return None

    async def send_last(self, data: bytes | bytearray | memoryview) -> None:
        """`send_all(data)` then `send_eof()` in one step, so the FIN leaves in the last
        data segment (a relay that read data and then EOF: one segment less)."""
        st = self._st
        if st.sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        tcp = st.conn.tcp
        if (
            len(data) <= tcp.send_buffer_free
            and not (st.local_closed or st.eof_sent or st.reset or st.finished)
        ):
            await checkpoint_if_cancelled()
            try:
                now = self._ns._now()
                tcp.send(data, now)
                st.eof_sent = True
                tcp.shutdown_write(now)
            except TCPStateError:
                await cancel_shielded_checkpoint()
                raise self._broken() from None
            self._ns._after(st, now)
            await cancel_shielded_checkpoint()
            return
        await self.send_all(data)
        await self.send_eof()

    async def wait_send_all_might_not_block(self) -> None:
        st = self._st
        if st.sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        st.sending = True
        try:
            await checkpoint()
            self._check_send()
            while st.conn.tcp.send_buffer_free == 0:
                await st.wait_writer()
                self._check_send()
        finally:
            st.sending = False

    async def send_eof(self) -> None:
        st = self._st
        if st.sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await checkpoint_if_cancelled()
        try:
            if st.local_closed:
                raise trio.ClosedResourceError("this stream was closed")
            if st.eof_sent:
                return
            if st.reset:
                raise self._broken()
            st.eof_sent = True
            now = self._ns._now()
            try:
                st.conn.tcp.shutdown_write(now)
            except TCPStateError:
                raise self._broken() from None
            self._ns._after(st, now)
        finally:
            await cancel_shielded_checkpoint()  # after the work, as send_all

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        st = self._st
        if st.receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        st.receiving = True
        try:
            # As trio's memory channels: a cancel point first, then either park (itself
            # a checkpoint) or a shielded schedule point after the read, so waiting for
            # data costs one task switch rather than two, and cancellation loses nothing.
            await checkpoint_if_cancelled()
            tcp = st.conn.tcp
            ns = self._ns
            parked = False
            while True:
                if st.local_closed:
                    exc: Exception = trio.ClosedResourceError("this stream was closed")
                    break
                if not st.reset:
                    now = ns._now()
                    data = tcp.read(max_bytes, now)
                    if data or st.eof:
                        if data and not st.finished:
                            ns._after(st, now, _READ)
                        if not parked:
                            await cancel_shielded_checkpoint()
                        return data
                if st.reset or st.finished:
                    exc = self._broken()
                    break
                await st.wait_reader(self._ns)
                parked = True
            if not parked:
                await cancel_shielded_checkpoint()
            raise exc
        finally:
            st.receiving = False

    async def aclose(self) -> None:
        """Graceful close: FIN after queued data (RST if unread data remains)."""
        self._close(abort=False)
        await checkpoint()

    def close(self) -> None:
        """`aclose()` without its checkpoint, for a caller that closes in a `finally`
        (never waits, never raises)."""
        self._close(abort=False)

    def abort(self) -> None:
        """Reset the connection now (RST); pending data is discarded."""
        self._close(abort=True)

    def _close(self, *, abort: bool) -> None:
        st = self._st
        if st.local_closed:
            return
        st.local_closed = True
        if not st.finished:
            now = self._ns._now()
            if abort:
                st.conn.tcp.abort(now)
            else:
                st.conn.tcp.close(now)
            self._ns._after(st, now)
        if st.reader is not None or st.writer is not None:
            st.wake_all()  # another task's wait ends: ClosedResourceError
