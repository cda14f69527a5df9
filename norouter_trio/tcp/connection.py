"""Sans-IO TCP connection: one RFC 9293 state machine, driven only by method calls.

Theory of operation
-------------------
Like aioquic's `QuicConnection`, a `TCPConnection` does no I/O and reads no clock. The
owner feeds it received segments (`receive_segment`), application calls (`send`, `read`,
`shutdown_write`, `close`, `abort`) and timer expiries (`handle_timer`), each with the
current time `now` in seconds. After any of these it collects the results:

- `segments_to_send(now)`: segments to put on the wire (addresses are the owner's job);
- `get_timer()`: the earliest deadline at which `handle_timer` must be called;
- `next_event()`: `Established`, `DataAvailable`, `EOFReceived`, `Writable`,
  `ConnectionReset`, `ConnectionClosed` (the last one: the connection may be forgotten).

State changes all go through `state.next_state` (the transition table). Input processing
follows RFC 9293 §3.10.7.4 step by step; a fast path for in-order data and pure ACKs in
ESTABLISHED comes first because that is nearly every segment of a bulk transfer.

Buffers: the send buffer is a bytearray holding everything from SND.UNA on (sent and
unsent); acknowledged bytes are deleted from the front (cheap in CPython). The receive
buffer is a bytearray of in-order bytes not yet read; out-of-order segments wait in a
small sorted list. Both are bounded by `TCPConfig`.

Loss recovery (recovery.py): RTO per RFC 6298 with go-back-N after a timeout; NewReno
fast retransmit/recovery; SACK holes retransmitted one per duplicate ACK, again if data
sent after them gets SACKed first; limited transmit and early retransmit for small
windows. ACKs: every second segment, at once for out-of-order data, gap fills and window
updates; within `pushed_ack_delay` (2 ms) when the application reads a pushed segment, and
within `fin_ack_delay` (40 ms) for a FIN that takes us to CLOSE-WAIT, so that an answer
(our reply, our FIN) sent meanwhile carries the ACK; otherwise after `delayed_ack`.

Hot paths: an in-order ACK (with or without data or FIN) in any synchronized state skips
the §3.10.7.4 checks that cannot apply to it; `segments_to_send` returns at once when no
public method was called since it last ran (`_quiet`: output depends only on the state,
never on `now` alone, and only public methods change the state), and early when there is
nothing to send; the SACK scoreboard is made on first SACK, the congestion controller
once the peer's MSS is known; ISNs come from a batch of OS randomness (one system call
per 512 connections); whether transitions are logged is asked once per connection.

Closing: `shutdown_write` sends FIN after the data; `close` also gives up reading (unread
or later data resets the connection, RFC 1122 §4.2.2.13); `abort` resets. After
`ConnectionClosed` call `segments_to_send` once more: an abort's RST is waiting there.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from dataclasses import dataclass

from .events import (
    CloseReason,
    ConnectionClosed,
    ConnectionReset,
    DataAvailable,
    EOFReceived,
    Established,
    Event,
    Writable,
)
from .packets import ACK, FIN, PSH, RST, SYN, Segment
from .recovery import NewReno, RTOEstimator, SackScoreboard
from .state import (
    APP_CAN_SEND,
    RECEIVING,
    SENDING,
    SYNCHRONIZED,
    Input,
    TCPState,
    TCPStateError,
    next_state,
    transitions,
)

__all__ = ["TCPConfig", "TCPConnection", "TCPStateError"]

log = logging.getLogger(__name__)
_debug_enabled = log.isEnabledFor
_DEBUG = logging.DEBUG
# Whether state transitions are logged: asked once per new connection, not once per
# transition (a dozen per short connection); a level change applies to later connections.
_trace = False

MASK = 0xFFFFFFFF
HALF = 0x80000000

CLOSED = TCPState.CLOSED
SYN_SENT = TCPState.SYN_SENT
SYN_RECEIVED = TCPState.SYN_RECEIVED
ESTABLISHED = TCPState.ESTABLISHED
FIN_WAIT_1 = TCPState.FIN_WAIT_1
FIN_WAIT_2 = TCPState.FIN_WAIT_2
CLOSE_WAIT = TCPState.CLOSE_WAIT
CLOSING = TCPState.CLOSING
LAST_ACK = TCPState.LAST_ACK
TIME_WAIT = TCPState.TIME_WAIT

DEFAULT_MSS = 65495  # 65535 (largest IPv4 datagram, link MTU 65536) - 20 (IP) - 20 (TCP)
DEFAULT_PEER_MSS = 536  # RFC 9293 §3.7.1: assumed when the SYN has no MSS option
_TS_OPT_LEN = 12  # timestamps option, padded (RFC 7323 §3)
_MAX_WSCALE = 14  # RFC 7323 §2.3
# With at least this much window left from our SYN-ACK the peer is not short of room: the
# first window update after a read may wait `pushed_ack_delay` for data to ride on.
_UPDATE_CAN_WAIT = 32768

_ESTABLISHED_EVENT = Established()
_DATA_EVENT = DataAvailable()
_EOF_EVENT = EOFReceived()
_WRITABLE_EVENT = Writable()
# Events are frozen (immutable): one shared instance per close reason.
_CLOSED_EVENTS = {reason: ConnectionClosed(reason) for reason in CloseReason}

# The whole transition table (the any-state entries expanded), so a transition is one dict
# lookup; `next_state` is only called to raise for a pair the table lacks.
_TRANSITIONS = transitions()

# Shared by every connection until its peer first SACKs: always empty, because only
# `add` puts ranges in and `_sack_board` swaps in a connection's own before any `add`.
_NO_SACK = SackScoreboard()

Address = tuple[str, int]


_RANDOM_BATCH = 512  # connections' worth of OS randomness per system call
_UNPACK_BATCH = struct.Struct(f"<{_RANDOM_BATCH}Q").unpack


class _RandomPool:
    """64-bit draws from `os.urandom`, fetched in batches: one system call per
    `_RANDOM_BATCH` connections instead of one each. The bytes are the OS's own (RFC 9293
    §3.4.1 asks for unpredictable ISNs); a forked child drops what its parent fetched."""

    __slots__ = ("_left",)

    def __init__(self) -> None:
        self._left: list[int] = []

    def take(self) -> int:
        left = self._left
        if not left:
            left.extend(_UNPACK_BATCH(os.urandom(8 * _RANDOM_BATCH)))
        return left.pop()

    def clear(self) -> None:
        self._left.clear()


_random = _RandomPool()
_random_left = _random._left  # read inline by `TCPConnection.__init__` (saves a call)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_random.clear)


def _sdiff(a: int, b: int) -> int:
    """Signed `a - b` modulo 2**32 (see seq.py).

    Hot paths spell out `((a - b + HALF) & MASK) - HALF` instead: a call costs more
    than the arithmetic.
    """
    return ((a - b + HALF) & MASK) - HALF


@dataclass(frozen=True)
class TCPConfig:
    """Per-connection tunables; defaults suit a stdio link (no real congestion, RTT in ms)."""

    mss: int = DEFAULT_MSS
    send_buffer: int = 2 * 1024 * 1024
    recv_buffer: int = 2 * 1024 * 1024
    nagle: bool = True
    time_wait: float = 1.0  # RFC 9293 says 2*MSL; a stdio link reorders nothing for long
    initial_rto: float = 1.0  # RFC 6298 §2.1
    min_rto: float = 0.2
    max_rto: float = 60.0
    delayed_ack: float = 0.04  # RFC 9293 §3.8.6.3 allows up to 0.5 s; we stay short
    # The ACK for a pushed segment the application has read waits at most this long for
    # the application's answer to carry it (0: sent at once).
    pushed_ack_delay: float = 0.002
    # The ACK of a FIN that takes us to CLOSE-WAIT waits at most this long for our own
    # FIN to carry it (0: sent at once). Linux, too, delays it a full delayed-ACK time
    # ("pingpong" mode on FIN): the application usually answers EOF by closing, and the
    # peer, already done sending, loses nothing by waiting.
    fin_ack_delay: float = 0.04
    max_retries: int = 12  # data retransmissions before ConnectionClosed(timeout)
    syn_retries: int = 6  # SYN / SYN-ACK retransmissions before giving up
    window_scaling: bool = True  # RFC 7323 §2
    sack: bool = True  # RFC 2018
    timestamps: bool = True  # RFC 7323 §3 (echoed; RTT is measured by timing segments)
    challenge_ack_limit: int = 10  # per second, RFC 5961 §7
    persist_max: float = 60.0  # cap for the zero-window probe interval
    fin_wait_2_timeout: float = 60.0  # after close(), if the peer never sends its FIN
    tail_loss_probe: bool = True  # RFC 8985 §7

    def __post_init__(self) -> None:
        if not 64 <= self.mss <= DEFAULT_MSS:
            raise ValueError(f"TCPConfig.mss must be 64..{DEFAULT_MSS}, got {self.mss}")
        for name in ("pushed_ack_delay", "fin_ack_delay"):
            value = getattr(self, name)
            if not 0 <= value <= 0.5:  # RFC 9293 §3.8.6.3: an ACK is delayed < 0.5 s
                raise ValueError(f"TCPConfig.{name} must be 0..0.5 s, got {value}")
        if self.send_buffer < 1 or self.recv_buffer < 1:
            raise ValueError("TCPConfig.send_buffer and recv_buffer must be positive")
        if self.recv_buffer > 65535 << _MAX_WSCALE:
            raise ValueError(f"TCPConfig.recv_buffer must be at most {65535 << _MAX_WSCALE}")


@functools.lru_cache(maxsize=64)
def _wscale_for(bufsize: int) -> int:
    """Smallest shift that lets the 16-bit window field cover the receive buffer (cached:
    asked three times per connection, with one buffer size per configuration)."""
    # The smallest s with 65535 << s >= bufsize is the bit length of ceil(bufsize/65535)-1.
    shift = ((bufsize + 65534) // 65535 - 1).bit_length() if bufsize > 65535 else 0
    return shift if shift < _MAX_WSCALE else _MAX_WSCALE


class TCPConnection:
    """One TCP connection, sans-IO (see the module docstring for how to drive it)."""

    __slots__ = (
        "_ack_now",
        "_app_closed",
        "_cc",
        "_challenge_count",
        "_challenge_start",
        "_data_event_queued",
        "_delack_deadline",
        "_eof",
        "_events",
        "_fin_queued",
        "_fin_seq",
        "_force_small",
        "_last_ooo",
        "_lport",
        "_ltx",
        "_nagle",
        "_ooo",
        "_ooo_fin",
        "_out",
        "_pass_mark",
        "_persist_backoff",
        "_persist_deadline",
        "_pto_deadline",
        "_pushed",
        "_quiet",
        "_rbuf",
        "_rcv_adv",
        "_rcv_wscale",
        "_rcvbufsize",
        "_retries",
        "_rexmit_budget",
        "_rexmit_log",
        "_rexmit_next",
        "_rmss",
        "_rport",
        "_rto",
        "_rto_deadline",
        "_rtt_seq",
        "_rtt_time",
        "_sack",
        "_sack_ok",
        "_sbuf",
        "_sbuf_start",
        "_segs_unacked",
        "_small_end",
        "_smss",
        "_snd_wscale",
        "_sndbufsize",
        "_syn_needed",
        "_syn_window_only",
        "_tlp_out",
        "_ts_offset",
        "_ts_ok",
        "_ts_recent",
        "_tw_deadline",
        "_want_writable",
        "_wnd_step",
        "_ws_ok",
        "config",
        "irs",
        "iss",
        "local",
        "max_snd_wnd",
        "rcv_nxt",
        "remote",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wl1",
        "snd_wl2",
        "snd_wnd",
        "state",
    )

    def __init__(
        self, local: Address, remote: Address, now: float, config: TCPConfig, isn: int | None
    ) -> None:
        """Use `connect()` or `accept()`; this only fills in a CLOSED connection."""
        global _trace
        _trace = _debug_enabled(_DEBUG)
        self.config = config
        self.local = local
        self.remote = remote
        self._lport = local[1]
        self._rport = remote[1]
        self.state = CLOSED
        # One 64-bit draw of OS randomness for both the ISS (RFC 9293 §3.4.1) and the
        # per-connection timestamp offset (RFC 7323 §5.4).
        rnd = _random_left.pop() if _random_left else _random.take()
        iss = rnd & MASK if isn is None else isn & MASK
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.max_snd_wnd = 0
        self.irs = 0
        self.rcv_nxt = 0
        self._rcv_adv = 0
        self._sbuf = bytearray()
        self._sbuf_start = (iss + 1) & MASK
        self._sndbufsize = config.send_buffer
        self._rcvbufsize = config.recv_buffer
        # Receiver SWS avoidance (RFC 9293 §3.8.6.2.2): window offers grow in steps of
        # at least min(buffer/2, MSS).
        self._wnd_step = min(config.recv_buffer >> 1, config.mss)
        self._rbuf = bytearray()
        self._ooo: list[tuple[int, bytes]] = []
        self._ooo_fin: int | None = None
        self._last_ooo = 0
        self._fin_queued = False
        self._eof = False
        self._force_small = False
        self._ws_ok = False
        self._fin_seq = 0
        self._app_closed = False
        self._rmss = config.mss
        self._smss = DEFAULT_PEER_MSS
        self._snd_wscale = 0
        self._rcv_wscale = 0
        self._sack_ok = False
        self._ts_ok = False
        self._ts_recent = 0
        self._ts_offset = rnd >> 32
        self._rto = RTOEstimator(config.initial_rto, config.min_rto, config.max_rto)
        # `_cc` (NewReno) is made by `_take_syn`, once the peer's MSS is known: nothing
        # reads it before the handshake.
        self._sack = _NO_SACK  # a real scoreboard once the peer first SACKs something
        self._rexmit_next = iss
        self._rexmit_budget = 0
        self._pass_mark = iss
        self._rexmit_log: list[tuple[int, int, int]] = []
        self._ltx = 0
        self._small_end = iss
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._retries = 0
        self._rto_deadline: float | None = None
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._delack_deadline: float | None = None
        self._tw_deadline: float | None = None
        self._pto_deadline: float | None = None
        self._tlp_out = False
        self._ack_now = False
        self._segs_unacked = 0
        self._pushed = False
        self._syn_needed = False
        self._syn_window_only = False  # our only window offer so far is the SYN-ACK's
        self._out: list[Segment] = []
        # True only while nothing happened since `segments_to_send` last ran: every public
        # method that changes the connection clears it, so a second call (the owner asks
        # after every event) returns at once. Output never depends on `now` alone.
        self._quiet = False
        self._events: list[Event] = []  # a handful at most: a list is 1/10 of a deque
        self._data_event_queued = False
        self._want_writable = False
        self._nagle = config.nagle
        self._challenge_count = 0
        self._challenge_start = now

    # ------------------------------------------------------------------ construction

    @classmethod
    def connect(
        cls,
        local: Address,
        remote: Address,
        now: float,
        config: TCPConfig | None = None,
        isn: int | None = None,
    ) -> TCPConnection:
        """Active open (RFC 9293 §3.10.1): the SYN is in the next `segments_to_send`."""
        conn = cls(local, remote, now, config or TCPConfig(), isn)
        conn._transition(Input.ACTIVE_OPEN)
        conn._syn_needed = True
        return conn

    @classmethod
    def accept(
        cls,
        local: Address,
        remote: Address,
        syn: Segment,
        now: float,
        config: TCPConfig | None = None,
        isn: int | None = None,
    ) -> TCPConnection:
        """Passive open from a received SYN (RFC 9293 §3.10.7.2, LISTEN state).

        The SYN-ACK is in the next `segments_to_send`. Data on the SYN is queued and
        acknowledged; it becomes readable once the handshake completes.
        """
        if not syn.flags & SYN or syn.flags & (ACK | RST):
            raise TCPStateError(
                f"accept() from {remote[0]}:{remote[1]} needs a bare SYN, got flags "
                f"{syn.flags:#04x}"
            )
        conn = cls(local, remote, now, config or TCPConfig(), isn)
        conn._transition(Input.PASSIVE_OPEN)
        conn._transition(Input.RCV_SYN)
        conn._take_syn(syn)
        conn.snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 §2.2)
        conn.max_snd_wnd = syn.window
        conn.snd_wl1 = syn.seq
        conn._syn_needed = True
        payload = syn.payload
        if payload:
            n = min(len(payload), conn._rcvbufsize)
            conn._rbuf += payload[:n]
            conn.rcv_nxt = (conn.rcv_nxt + n) & MASK
        return conn

    # ------------------------------------------------------------------ properties

    @property
    def bytes_in_send_buffer(self) -> int:
        """Bytes queued by `send()` and not yet acknowledged by the peer."""
        return len(self._sbuf)

    @property
    def readable_bytes(self) -> int:
        """In-order bytes waiting for `read()`."""
        return len(self._rbuf)

    @property
    def send_buffer_free(self) -> int:
        return max(0, self._sndbufsize - len(self._sbuf))

    @property
    def eof_received(self) -> bool:
        """The peer's FIN has been reached in sequence."""
        return self._eof

    @property
    def nodelay(self) -> bool:
        return not self._nagle

    def set_nodelay(self, on: bool) -> None:
        """Disable (True) or re-enable (False) Nagle's algorithm (RFC 9293 §3.7.4)."""
        self._nagle = not on
        self._quiet = False

    # ------------------------------------------------------------------ application calls

    def send(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue bytes for sending; returns how many fit in the send buffer.

        When fewer than `len(data)` were taken, or the buffer is now full, a `Writable`
        event follows once the peer acknowledges data and room frees up.
        """
        self._quiet = False
        if self.state not in APP_CAN_SEND or self._fin_queued:
            raise TCPStateError(
                f"cannot send to {self.remote[0]}:{self.remote[1]}: connection is "
                f"{self.state.value}{' and shut down for writing' if self._fin_queued else ''}"
            )
        sbuf = self._sbuf
        room = self._sndbufsize - len(sbuf)
        n = len(data)
        if n >= room:
            # Cut short, or the buffer is now exactly full: either way the caller will
            # want to hear when room frees up.
            self._want_writable = True
            if n > room:
                n = max(room, 0)
                if n == 0:
                    return 0
                data = memoryview(data)[:n]
        sbuf += data
        return n

    def read(self, max_bytes: int, now: float) -> bytes:
        """Take up to `max_bytes` in-order bytes; b"" when none are buffered.

        Reading opens the receive window; a window update is sent when it grows enough
        to matter (receiver SWS avoidance, RFC 9293 §3.8.6.2.2).
        """
        rbuf = self._rbuf
        have = len(rbuf)
        if have == 0 or max_bytes <= 0:
            return b""
        self._quiet = False
        if max_bytes >= have:
            data = bytes(rbuf)
            rbuf.clear()
        else:
            with memoryview(rbuf) as mv:
                data = mv[:max_bytes].tobytes()
            del rbuf[:max_bytes]
        # The application consumed a pushed (end of a write) segment: ACK soon rather
        # than at the delayed-ACK timer, so a sender held back by Nagle does not stall
        # (the same idea as Linux's ICSK_ACK_PUSHED). "Soon" is `pushed_ack_delay`: an
        # answer sent meanwhile carries the ACK, one segment instead of two for a
        # request and its reply. (Not once the peer's FIN is in: it sends nothing more,
        # so nothing can stall, and the ACK waits for our FIN; see `_rcv_fin`.)
        deadline = self._delack_deadline
        delay = 0.0
        if self._pushed and not rbuf and not self._eof:
            delay = self.config.pushed_ack_delay
            if deadline is not None:
                if delay <= 0:
                    self._ack_now = True
                elif now + delay < deadline:
                    self._delack_deadline = deadline = now + delay
        if self.state in RECEIVING:
            adv = ((self._rcv_adv - self.rcv_nxt + HALF) & MASK) - HALF
            grow = self._rcvbufsize - len(rbuf) - (adv if adv > 0 else 0)
            # The threshold is never below `_wnd_step`: most small reads stop here.
            if grow >= self._wnd_step and grow >= min(
                self._rcvbufsize // 2, 2 * self._rmss if adv >= self._rmss else self._rmss
            ):
                if delay and self._syn_window_only and adv >= _UPDATE_CAN_WAIT:
                    # The first read after our SYN-ACK, whose window field could not be
                    # scaled (RFC 7323 §2.2): the peer still has plenty of room, so
                    # this update may wait for the answer too.
                    if deadline is None or now + delay < deadline:
                        self._delack_deadline = now + delay
                else:
                    self._ack_now = True
        return data

    def shutdown_write(self, now: float) -> None:
        """Send FIN after all queued data (RFC 9293 §3.10.4 CLOSE); reading continues."""
        if self._fin_queued:
            return
        self._quiet = False
        st = self.state
        if st not in APP_CAN_SEND:
            if st is CLOSED:
                return
            raise TCPStateError(f"cannot shut down writing in state {st.value}")
        self._fin_queued = True
        self._fin_seq = (self._sbuf_start + len(self._sbuf)) & MASK
        if st is ESTABLISHED or st is CLOSE_WAIT:
            self._transition(Input.APP_SHUTDOWN)
        # In SYN-SENT/SYN-RECEIVED the FIN waits for ESTABLISHED (RFC 9293 §3.10.4).

    def close(self, now: float) -> None:
        """The application is done reading and writing.

        Unread data, or data arriving later, resets the connection as RFC 1122 §4.2.2.13
        asks, so the peer learns its data was not consumed.
        """
        self._quiet = False
        st = self.state
        if st is CLOSED:
            return
        if st is SYN_SENT and not self._sbuf:
            self._transition(Input.APP_CLOSE_EARLY)
            self._finish(CloseReason.NORMAL)
            return
        self._app_closed = True
        if self._rbuf:
            self.abort(now)
            return
        if st in APP_CAN_SEND:
            self.shutdown_write(now)
        elif st is FIN_WAIT_2 and self._tw_deadline is None:
            self._tw_deadline = now + self.config.fin_wait_2_timeout

    def abort(self, now: float) -> None:
        """Reset the connection (RFC 9293 §3.10.5 ABORT): RST out, CLOSED, reason reset.

        The RST is returned by the next `segments_to_send`.
        """
        self._quiet = False
        st = self.state
        if st is CLOSED:
            return
        if st is not SYN_SENT and st is not TIME_WAIT:
            seq = self.snd_max if st is not SYN_RECEIVED else self.snd_nxt
            self._out.append(self._make(seq, RST | ACK, b"", now))
        self._transition(Input.APP_ABORT)
        self._finish(CloseReason.NORMAL if st is TIME_WAIT else CloseReason.RESET)

    # ------------------------------------------------------------------ outputs

    def next_event(self) -> Event | None:
        events = self._events
        if not events:
            return None
        ev = events.pop(0)
        if ev is _DATA_EVENT:
            self._data_event_queued = False
        return ev

    @property
    def control_pending(self) -> bool:
        """Whether `segments_to_send` would now send something other than new data: an
        ACK, a SYN or SYN-ACK, a RST or probe already made, or a FIN not yet sent.
        (Conservative: may say True when it would not; never False when it would.) An
        owner holding output for the application's answer to carry holds only this."""
        if self._quiet:
            return False
        return bool(
            self._out
            or self._ack_now
            or self._syn_needed
            or (self._fin_queued and self.snd_nxt == self._fin_seq)
        )

    def get_timer(self) -> float | None:
        """Earliest deadline (RTO, persist, delayed ACK, TIME-WAIT or FIN-WAIT-2), or None."""
        # Unrolled (no tuple, no loop): the layer above asks after every segment.
        best = self._rto_deadline
        t = self._persist_deadline
        if t is not None and (best is None or t < best):
            best = t
        t = self._delack_deadline
        if t is not None and (best is None or t < best):
            best = t
        t = self._tw_deadline
        if t is not None and (best is None or t < best):
            best = t
        t = self._pto_deadline
        if t is not None and (best is None or t < best):
            best = t
        return best

    def handle_timer(self, now: float) -> None:
        """Run every timer whose deadline is at or before `now`."""
        self._quiet = False
        t = self._tw_deadline
        if t is not None and t <= now:
            self._tw_deadline = None
            if self.state is TIME_WAIT:
                self._transition(Input.TIME_WAIT_EXPIRED)
            else:
                # FIN-WAIT-2 after close(): all our data was acknowledged and nobody
                # wants what the peer might still send (like Linux's tcp_fin_timeout).
                self._transition(Input.GIVE_UP)
            self._finish(CloseReason.NORMAL)
            return
        t = self._rto_deadline
        if t is not None and t <= now:
            self._rto_deadline = None
            self._pto_deadline = None
            self._on_rto(now)
            if self.state is CLOSED:
                return
        t = self._pto_deadline
        if t is not None and t <= now:
            self._pto_deadline = None
            self._on_pto(now)
        t = self._persist_deadline
        if t is not None and t <= now:
            self._persist_deadline = None
            self._on_persist(now)
        t = self._delack_deadline
        if t is not None and t <= now:
            self._delack_deadline = None
            self._ack_now = True

    def segments_to_send(self, now: float) -> list[Segment]:
        """Everything to transmit now: control segments, (re)transmissions, ACKs."""
        if self._quiet:
            return []  # nothing happened since the last call, which sent all it could
        self._quiet = True
        out = self._out
        st = self.state
        if out:
            self._out = []
            if st is CLOSED:
                return out
        elif st is CLOSED:
            return []
        else:
            out = []
        if self._syn_needed or (st is SYN_RECEIVED and self._ack_now):
            # In SYN-RECEIVED every answer is the SYN-ACK (RFC 9293 §3.10.7.4).
            self._syn_needed = False
            out.append(self._make_syn(now))
        elif st in SENDING:
            nxt = self.snd_nxt
            if (
                self._rexmit_budget > 0
                or nxt != (self._sbuf_start + len(self._sbuf)) & MASK
                or (self._fin_queued and nxt == self._fin_seq)  # FIN not sent yet
            ):
                self._output_data(now, out)
        if self._ack_now and st is not SYN_SENT:
            out.append(self._make(self.snd_nxt, ACK, b"", now))
        return out

    # ------------------------------------------------------------------ segment building

    def _make(self, seq: int, flags: int, payload: bytes, now: float) -> Segment:
        """A segment carrying our current ACK, window, timestamps and SACK blocks."""
        # Window (RFC 9293 §3.8.6.2.2 receiver SWS avoidance; never shrink the right
        # edge, §3.8.6). Offers grow only in steps of min(buffer/2, MSS).
        rcv_nxt = self.rcv_nxt
        adv = ((self._rcv_adv - rcv_nxt + HALF) & MASK) - HALF
        if adv < 0:
            adv = 0
        free = self._rcvbufsize - len(self._rbuf)
        wnd = free if free - adv >= self._wnd_step else adv
        ws = self._rcv_wscale
        if ws:
            field = (wnd + (1 << ws) - 1) >> ws
            if field > 65535:
                field = 65535
            self._rcv_adv = (rcv_nxt + (field << ws)) & MASK
        else:
            field = wnd if wnd < 65535 else 65535
            self._rcv_adv = (rcv_nxt + field) & MASK
        # All fields positionally in one call: cheaper than setting options afterwards.
        sack = self._sack_blocks() if self._ooo and self._sack_ok else ()
        if self._ts_ok:
            ts_val = (int(now * 1000) + self._ts_offset) & MASK
            seg = Segment(
                self._lport, self._rport, seq, rcv_nxt, flags, field, payload,
                None, None, False, sack, ts_val, self._ts_recent,
            )  # fmt: skip
        else:
            seg = Segment(
                self._lport, self._rport, seq, rcv_nxt, flags, field, payload,
                None, None, False, sack,
            )  # fmt: skip
        if flags & ACK:
            self._ack_now = False
            self._delack_deadline = None
            self._segs_unacked = 0
            self._pushed = False
            self._syn_window_only = False
        return seg

    def _make_syn(self, now: float) -> Segment:
        """SYN (active open) or SYN-ACK, with options (RFC 9293 §3.7.1, RFC 7323, 2018)."""
        iss = self.iss
        if self.state is SYN_SENT:
            cfg = self.config
            bufsize = self._rcvbufsize
            ts = cfg.timestamps
            seg = Segment(
                self._lport,
                self._rport,
                iss,
                0,
                SYN,
                bufsize if bufsize < 65535 else 65535,  # the window of a SYN is never scaled
                b"",
                self._rmss,
                _wscale_for(bufsize) if cfg.window_scaling else None,
                cfg.sack,
                (),
                (int(now * 1000) + self._ts_offset) & MASK if ts else None,
                0 if ts else None,
            )
        else:
            win = self._rcvbufsize - len(self._rbuf)
            if win > 65535:
                win = 65535
            elif win < 0:
                win = 0
            rcv_nxt = self.rcv_nxt
            self._rcv_adv = (rcv_nxt + win) & MASK
            ts_ok = self._ts_ok
            seg = Segment(
                self._lport,
                self._rport,
                iss,
                rcv_nxt,
                SYN | ACK,
                win,
                b"",
                self._rmss,
                self._rcv_wscale if self._ws_ok else None,
                self._sack_ok,
                (),
                (int(now * 1000) + self._ts_offset) & MASK if ts_ok else None,
                self._ts_recent if ts_ok else None,
            )
            self._ack_now = False
            self._delack_deadline = None
            self._syn_window_only = True
        nxt = self.snd_nxt = (iss + 1) & MASK
        if self.snd_max == iss:
            self.snd_max = nxt
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rto.rto
        if self._retries == 0 and self._rtt_seq is None:
            self._rtt_seq = iss
            self._rtt_time = now
        return seg

    def _sack_blocks(self) -> tuple[tuple[int, int], ...]:
        """Up to 3 (4 without timestamps) SACK blocks, most recent first (RFC 2018 §4)."""
        merged: list[list[int]] = []
        for s, d in self._ooo:
            e = (s + len(d)) & MASK
            if merged and _sdiff(s, merged[-1][1]) <= 0:
                if _sdiff(e, merged[-1][1]) > 0:
                    merged[-1][1] = e
            else:
                merged.append([s, e])
        limit = 3 if self._ts_ok else 4
        last = self._last_ooo
        first = [b for b in merged if _sdiff(b[0], last) <= 0 < _sdiff(b[1], last)]
        rest = [b for b in merged if not first or b is not first[0]]
        blocks = [(b[0], b[1]) for b in first + rest]
        return tuple(blocks[:limit])

    def _max_payload(self) -> int:
        """Payload bytes per segment: peer MSS less our options (RFC 6691)."""
        n = self._smss
        if self._ts_ok:
            n -= _TS_OPT_LEN
        if self._ooo and self._sack_ok:
            n -= 4 + 8 * min(len(self._ooo), 3 if self._ts_ok else 4)
        return n

    # ------------------------------------------------------------------ sending data

    def _output_data(self, now: float, out: list[Segment]) -> None:
        """Retransmissions first, then new data within min(cwnd, peer window).

        Called only when there is something to (re)send: see `segments_to_send`.
        """
        sbuf = self._sbuf
        base = self._sbuf_start
        data_end = (base + len(sbuf)) & MASK
        if self._ooo and self._sack_ok:
            maxpay = self._max_payload()
        else:
            maxpay = self._smss - _TS_OPT_LEN if self._ts_ok else self._smss
        sent = False  # anything (re)transmitted here: the loss probe timer may start
        if self._rexmit_budget > 0:
            before = len(out)
            self._output_rexmit(now, out, maxpay)
            sent = len(out) > before
        nxt = self.snd_nxt
        if nxt == data_end:
            # No new data: at most our FIN, alone (it needs no window, RFC 9293 §3.10.4).
            # The common case of a close, without the window arithmetic below.
            if self._fin_queued and nxt == self._fin_seq:
                out.append(self._make(nxt, FIN | ACK, b"", now))
                self._advance_snd_nxt((nxt + 1) & MASK, now)
                sent = True
            if sent and self.snd_una != self.snd_max:
                self._arm_pto(now)
            return
        una = self.snd_una
        if nxt == una:
            # Nothing in flight and all the unsent data fits one segment and both windows
            # (a request, a reply): it goes at once, as the loop below would send it, since
            # neither sender SWS avoidance nor Nagle holds back all that is left.
            n = ((data_end - nxt + HALF) & MASK) - HALF
            if 0 < n <= maxpay and n <= self.snd_wnd and n <= self._cc.cwnd:
                off = (nxt - base) & MASK
                if off == 0 and n == len(sbuf):
                    payload = bytes(sbuf)
                else:
                    with memoryview(sbuf) as mv:
                        payload = mv[off : off + n].tobytes()
                end = (nxt + n) & MASK
                flags = ACK | PSH
                if self._fin_queued and end == self._fin_seq:
                    flags = ACK | PSH | FIN
                    end = (end + 1) & MASK
                out.append(self._make(nxt, flags, payload, now))
                self._advance_snd_nxt(end, now)
                if n < maxpay:
                    self._small_end = end
                self._arm_pto(now)
                return
        fin_queued = self._fin_queued
        fin_seq = self._fin_seq
        cwnd = self._cc.cwnd
        snd_wnd = self.snd_wnd
        if self._ltx:
            cwnd += self._ltx * maxpay  # limited transmit (RFC 3042 §2)
        wnd = cwnd if cwnd < snd_wnd else snd_wnd
        while True:
            nxt = self.snd_nxt
            unsent = ((data_end - nxt + HALF) & MASK) - HALF
            if unsent <= 0:
                if fin_queued and nxt == fin_seq:
                    # FIN alone; it needs no window (RFC 9293 §3.10.4).
                    out.append(self._make(nxt, FIN | ACK, b"", now))
                    self._advance_snd_nxt((nxt + 1) & MASK, now)
                    sent = True
                break
            in_flight = ((nxt - una + HALF) & MASK) - HALF
            usable = wnd - in_flight
            n = unsent
            if n > maxpay:
                n = maxpay
            if n > usable:
                n = usable
            if n <= 0:
                if snd_wnd <= in_flight and in_flight == 0:
                    self._arm_persist(now)
                break
            if n < unsent and n < maxpay:
                # Sender SWS avoidance (RFC 9293 §3.8.6.2.1): wait for a useful window,
                # unless the persist timer ran out (the "override timeout").
                # Data below SND.MAX (resent after a timeout) was sent before: no waiting.
                if (
                    n < (self.max_snd_wnd >> 1)
                    and not self._force_small
                    and ((nxt - self.snd_max + HALF) & MASK) - HALF >= 0
                ):
                    if in_flight == 0:
                        self._arm_persist(now)
                    break
                self._force_small = False
            elif (
                n == unsent
                and n < maxpay
                and self._nagle
                and in_flight > 0
                and not fin_queued
                and ((nxt - self.snd_max + HALF) & MASK) - HALF >= 0
                and ((self._small_end - una + HALF) & MASK) - HALF > 0
            ):
                # Nagle (RFC 9293 §3.7.4) in Minshall's form: hold a small segment only
                # while an earlier small one is unacknowledged, so the short tail of a
                # bulk write is not held until a delayed ACK for the full ones.
                break
            off = (nxt - base) & MASK
            with memoryview(sbuf) as mv:
                payload = mv[off : off + n].tobytes()
            end = (nxt + n) & MASK
            flags = ACK
            if n == unsent:
                flags |= PSH
                if fin_queued and end == fin_seq:
                    flags |= FIN
                    end = (end + 1) & MASK
            out.append(self._make(nxt, flags, payload, now))
            self._advance_snd_nxt(end, now)
            sent = True
            if n < maxpay:
                self._small_end = end
        if sent and self.snd_una != self.snd_max:
            self._arm_pto(now)

    def _advance_snd_nxt(self, end: int, now: float) -> None:
        """Bookkeeping after transmitting up to `end`: SND.MAX, RTT timing, RTO timer."""
        self.snd_nxt = end
        if ((end - self.snd_max + HALF) & MASK) - HALF > 0:
            if self._rtt_seq is None:
                self._rtt_seq = self.snd_max  # time this segment (RFC 6298 §3)
                self._rtt_time = now
            self.snd_max = end
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rto.rto  # RFC 6298 §5.1
            self._persist_deadline = None

    def _output_rexmit(self, now: float, out: list[Segment], maxpay: int) -> None:
        """Fast retransmit / NewReno / SACK-hole retransmissions (RFC 5681, 6582, 2018)."""
        una = self.snd_una
        sbuf = self._sbuf
        base = self._sbuf_start
        data_end = (base + len(sbuf)) & MASK
        while self._rexmit_budget > 0:
            start = self._rexmit_next
            if _sdiff(start, una) < 0:
                start = una
            hole: tuple[int, int] | None
            if self._sack.ranges:
                hole = self._sack.next_hole(start, una)
            else:
                hole = (una, self.snd_max) if start == una else None
            if hole is None:
                self._rexmit_budget = 0
                return
            s, e = hole
            n = min(
                maxpay,
                _sdiff(e, s),
                max(_sdiff(data_end, s), 0),
            )
            flags = ACK
            end = (s + n) & MASK
            fin_sent = self._fin_queued and _sdiff(self.snd_max, self._fin_seq) > 0
            if fin_sent and end == self._fin_seq and _sdiff(e, end) > 0:
                flags |= FIN
            elif n <= 0:
                self._rexmit_budget = 0
                return
            off = (s - base) & MASK
            with memoryview(sbuf) as mv:
                payload = mv[off : off + n].tobytes()
            out.append(self._make(s, flags, payload, now))
            self._rexmit_next = (end + (1 if flags & FIN else 0)) & MASK
            self._rexmit_budget -= 1
            self._pass_mark = self.snd_max  # SACKs beyond this prove it was lost, if so
            if len(self._rexmit_log) < 256:
                self._rexmit_log.append((s, self._rexmit_next, self.snd_max))
            cc = self._cc
            if cc.in_recovery and cc.cwnd > cc.ssthresh:
                # The retransmission uses the room this duplicate ACK inflated, so a
                # hole and a new segment do not both go out for one packet that left
                # the network (packet conservation, RFC 6675 §5's "pipe" in spirit).
                cc.cwnd -= n
            self._rtt_seq = None  # Karn: nothing in flight now is a clean sample
            if self._rto_deadline is None:
                self._rto_deadline = now + self._rto.rto

    def _arm_pto(self, now: float) -> None:
        """Tail loss probe timer (RFC 8985 §7.2), when nothing new is left to send.

        Without it a lost last segment (no later data, so no duplicate ACKs) waits for
        the RTO; two smoothed RTTs later, the probe retransmits it instead.
        """
        srtt = self._rto.srtt
        snd_max = self.snd_max
        flight = ((snd_max - self.snd_una + HALF) & MASK) - HALF
        if (
            srtt is None
            or flight <= 0
            or self.snd_nxt != snd_max
            or self._retries  # after a timeout we are in loss recovery (§7.2)
            or self._tlp_out  # one probe until SND.UNA advances
            or not self.config.tail_loss_probe
        ):
            self._pto_deadline = None
            return
        pto = 2 * srtt
        if flight <= self._smss:
            pto += self.config.delayed_ack  # a lone segment's ACK may be delayed
        deadline = now + (pto if pto > 0.01 else 0.01)
        rto = self._rto_deadline
        self._pto_deadline = deadline if rto is None or deadline < rto else None

    def _on_pto(self, now: float) -> None:
        """Send the tail loss probe (RFC 8985 §7.3): new data if the peer's window takes
        it (cwnd notwithstanding), else the last segment sent, again."""
        if self.state not in SENDING or self.snd_una == self.snd_max:
            return
        base = self._sbuf_start
        maxpay = self._max_payload()
        data_end = (base + len(self._sbuf)) & MASK
        nxt = self.snd_nxt
        unsent = _sdiff(data_end, nxt)
        room = self.snd_wnd - _sdiff(nxt, self.snd_una)
        if unsent > 0 and room > 0 and nxt == self.snd_max:
            n = min(unsent, maxpay, room)
            off = (nxt - base) & MASK
            with memoryview(self._sbuf) as mv:
                payload = mv[off : off + n].tobytes()
            end = (nxt + n) & MASK
            flags = ACK | PSH if n == unsent else ACK
            if n == unsent and self._fin_queued and end == self._fin_seq:
                flags |= FIN
                end = (end + 1) & MASK
            self._out.append(self._make(nxt, flags, payload, now))
            self._advance_snd_nxt(end, now)
            self._tlp_out = True
            return
        sent_end = data_end if unsent <= 0 else nxt
        n = min(max(_sdiff(sent_end, self.snd_una), 0), maxpay)
        start = (sent_end - n) & MASK
        flags = ACK
        if unsent <= 0 and self._fin_queued and _sdiff(self.snd_max, self._fin_seq) > 0:
            flags |= FIN
        elif n == 0:
            return
        off = (start - base) & MASK
        with memoryview(self._sbuf) as mv:
            payload = mv[off : off + n].tobytes()
        self._out.append(self._make(start, flags, payload, now))
        self._rexmit_log.append((start, self.snd_max, self.snd_max))
        self._tlp_out = True
        self._rtt_seq = None  # Karn
        self._rto_deadline = now + self._rto.rto

    def _arm_persist(self, now: float) -> None:
        """Zero-window probing (RFC 9293 §3.8.6.1) when nothing is in flight."""
        if self._persist_deadline is None and self._rto_deadline is None:
            interval = self._rto.rto * (1 << min(self._persist_backoff, 16))
            self._persist_deadline = now + min(interval, self.config.persist_max)

    def _on_persist(self, now: float) -> None:
        """Send a window probe; the peer must answer it with its current window.

        The probe is an old sequence number with no data (SND.UNA - 1), which any TCP
        answers with an ACK (RFC 9293 §3.10.7.4) without our having to commit a byte
        beyond the offered window.
        """
        if self.state not in SENDING:
            return
        unsent = _sdiff((self._sbuf_start + len(self._sbuf)) & MASK, self.snd_nxt)
        if unsent <= 0 or _sdiff(self.snd_nxt, self.snd_una) > 0:
            self._persist_backoff = 0
            return
        if self.snd_wnd > 0:
            self._force_small = True  # SWS override: send what the small window takes
        else:
            self._out.append(self._make((self.snd_una - 1) & MASK, ACK, b"", now))
        self._persist_backoff += 1
        self._arm_persist(now)

    def _on_rto(self, now: float) -> None:
        """Retransmission timeout (RFC 6298 §5.4-5.7, RFC 5681 §3.1)."""
        st = self.state
        cfg = self.config
        self._retries += 1
        if st is SYN_SENT or st is SYN_RECEIVED:
            if self._retries > cfg.syn_retries:
                self._give_up(now)
                return
            self._rto.backoff()
            self._rtt_seq = None
            self._syn_needed = True
            return
        if st not in SENDING or self.snd_una == self.snd_max:
            return
        if self._retries > cfg.max_retries:
            self._give_up(now)
            return
        if self.snd_wnd == 0:
            # The peer closed its window with our data outstanding (and the update
            # that reopened it may be lost): probe rather than resend beyond the window
            # (RFC 9293 §3.8.6.1). A live peer's answer resets the retry count.
            self._rto.backoff()
            self._out.append(self._make((self.snd_una - 1) & MASK, ACK, b"", now))
            self._rto_deadline = now + self._rto.rto
            return
        flight = _sdiff(self.snd_max, self.snd_una)
        self._cc.on_timeout(self.snd_max, flight)
        self._rto.backoff()
        self._rtt_seq = None
        self._sack.clear()  # RFC 2018 §8: the receiver may have reneged
        self._rexmit_log.clear()
        self._rexmit_budget = 0
        self.snd_nxt = self.snd_una  # go back N; the output loop resends from SND.UNA
        self._rto_deadline = now + self._rto.rto
        if log.isEnabledFor(logging.DEBUG):
            log.debug("RTO %r rto=%.3f retries=%d", self, self._rto.rto, self._retries)

    def _give_up(self, now: float) -> None:
        """User timeout (RFC 9293 §3.8.3): too many retransmissions."""
        if self.state in SYNCHRONIZED or self.state is SYN_RECEIVED:
            self._out.append(self._make(self.snd_max, RST | ACK, b"", now))
        self._transition(Input.GIVE_UP)
        self._finish(CloseReason.TIMEOUT)

    # ------------------------------------------------------------------ receiving

    def receive_segment(self, seg: Segment, now: float) -> None:
        """Process one segment addressed to this connection (RFC 9293 §3.10.7)."""
        self._quiet = False
        st = self.state
        flags = seg.flags
        # Fast path (header prediction): a synchronized state, ACK (+PSH, +FIN) without
        # SYN or RST, in order, no out-of-order queue. RFC 9293 §3.10.7.4's first to
        # fourth steps have nothing to do for such a segment (SEG.SEQ == RCV.NXT is
        # always acceptable), so it goes straight to the ACK, text and FIN steps.
        if (
            (flags & (SYN | RST | ACK)) == ACK
            and st in SYNCHRONIZED
            and seg.seq == self.rcv_nxt
            and not self._ooo
            and self._ooo_fin is None
        ):
            if self._ts_ok:
                tsv = seg.ts_val
                if tsv is not None and (
                    st is ESTABLISHED or ((tsv - self._ts_recent + HALF) & MASK) - HALF >= 0
                ):
                    self._ts_recent = tsv  # RFC 7323 §4.3 (SEG.SEQ == Last.ACK.sent)
            if not self._process_ack(seg, now):
                return
            payload = seg.payload
            n = len(payload)
            if flags & FIN or st is not ESTABLISHED:
                if n or flags & FIN:
                    st = self.state
                    if st in RECEIVING:
                        if not n and ((self._rcv_adv - self.rcv_nxt + HALF) & MASK) - HALF >= 0:
                            self._rcv_fin(now)  # a bare FIN in sequence: the usual close
                        else:
                            self._rcv_text(seg.seq, payload, bool(flags & FIN), now)
                    elif st is TIME_WAIT and flags & FIN:
                        self._ack_now = True
                        self._tw_deadline = now + self.config.time_wait
                return
            if n:
                room = ((self._rcv_adv - self.rcv_nxt + HALF) & MASK) - HALF
                if n <= room and not self._app_closed:
                    self._rbuf += payload
                    self.rcv_nxt = (self.rcv_nxt + n) & MASK
                    self._data_arrived()
                    self._segs_unacked += 1
                    if (
                        self._segs_unacked >= 2
                        or ((self._rcv_adv - self.rcv_nxt + HALF) & MASK) - HALF < 2 * n
                    ):
                        # Every second segment (RFC 9293 §3.8.6.3), or at once when the
                        # sender has too little window left to send two more like it.
                        # Queued now, not coalesced over a batch of input: a lone ACK
                        # for many segments, if lost, leaves the sender nothing.
                        self._out.append(self._make(self.snd_nxt, ACK, b"", now))
                    elif self._delack_deadline is None:
                        self._delack_deadline = now + self.config.delayed_ack
                    if flags & PSH:
                        self._pushed = True
                    return
                self._rcv_text(seg.seq, payload, False, now)
            return
        if st is SYN_SENT:
            self._rcv_syn_sent(seg, now)
            return
        if st is CLOSED:
            self._reply_rst(seg, now)
            return
        self._rcv_general(seg, now)

    def _reply_rst(self, seg: Segment, now: float) -> None:
        """RST for a segment that has no connection (RFC 9293 §3.10.7.1)."""
        if seg.flags & RST:
            return
        if seg.flags & ACK:
            rst = Segment(self._lport, self._rport, seg.ack, 0, RST, 0)
        else:
            seglen = (
                len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
            )
            rst = Segment(self._lport, self._rport, 0, (seg.seq + seglen) & MASK, RST | ACK, 0)
        self._out.append(rst)

    def _take_syn(self, seg: Segment) -> None:
        """Record IRS and negotiate options from the peer's SYN / SYN-ACK."""
        cfg = self.config
        self.irs = seg.seq
        self.rcv_nxt = (seg.seq + 1) & MASK
        smss = seg.mss or DEFAULT_PEER_MSS
        if smss > cfg.mss:
            smss = cfg.mss
        if smss < 64:
            smss = 64
        self._smss = smss
        ts_val = seg.ts_val
        if cfg.timestamps and ts_val is not None:
            self._ts_ok = True
            self._ts_recent = ts_val
            smss -= _TS_OPT_LEN
        self._cc = NewReno(smss, self.iss)
        wscale = seg.wscale
        if wscale is not None and cfg.window_scaling:
            self._snd_wscale = wscale if wscale < _MAX_WSCALE else _MAX_WSCALE
            self._rcv_wscale = _wscale_for(self._rcvbufsize)
            self._ws_ok = True
        self._sack_ok = cfg.sack and seg.sack_permitted

    def _rcv_syn_sent(self, seg: Segment, now: float) -> None:
        """SYN-SENT processing (RFC 9293 §3.10.7.3)."""
        flags = seg.flags
        if flags & ACK and (
            ((seg.ack - self.iss + HALF) & MASK) - HALF <= 0
            or ((seg.ack - self.snd_max + HALF) & MASK) - HALF > 0
        ):
            if not flags & RST:
                self._out.append(Segment(self._lport, self._rport, seg.ack, 0, RST, 0))
            return
        if flags & RST:
            if flags & ACK:  # acceptable ACK: the peer refuses
                self._transition(Input.RCV_RST)
                self._finish(CloseReason.REFUSED)
            return
        if not flags & SYN:
            return
        self._take_syn(seg)
        if flags & ACK:
            self._transition(Input.RCV_SYN_ACK)
            self._rto_deadline = None
            if self._rtt_seq is not None and self._retries == 0:
                self._rto.sample(now - self._rtt_time)
            self._rtt_seq = None
            self._retries = 0
            ack = seg.ack
            self.snd_una = self.snd_nxt = self.snd_wl2 = ack
            # The window of a SYN-ACK is never scaled (RFC 7323 §2.2), nor was ours.
            self.snd_wnd = self.max_snd_wnd = seg.window
            self.snd_wl1 = seg.seq
            bufsize = self._rcvbufsize
            self._rcv_adv = (self.rcv_nxt + (bufsize if bufsize < 65535 else 65535)) & MASK
            self._on_established()
            self._ack_now = True
            if seg.payload or flags & FIN:
                self._rcv_text((seg.seq + 1) & MASK, seg.payload, bool(flags & FIN), now)
        else:
            # Simultaneous open (RFC 9293 §3.5, Figure 8): answer with SYN-ACK.
            self._transition(Input.RCV_SYN)
            self.snd_wnd = seg.window
            self.max_snd_wnd = seg.window
            self.snd_wl1 = seg.seq
            self._syn_needed = True

    def _on_established(self) -> None:
        self._events.append(_ESTABLISHED_EVENT)
        if self._rbuf:
            self._data_arrived()
        if self._fin_queued:
            self._transition(Input.APP_SHUTDOWN)

    def _data_arrived(self) -> None:
        if not self._data_event_queued and self.state is not SYN_RECEIVED:
            self._data_event_queued = True
            self._events.append(_DATA_EVENT)

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 §3.2/§4.2: answer a suspicious RST/SYN with an ACK, rate-limited."""
        if now - self._challenge_start >= 1.0:
            self._challenge_start = now
            self._challenge_count = 0
        if self._challenge_count < self.config.challenge_ack_limit:
            self._challenge_count += 1
            self._out.append(self._make(self.snd_nxt, ACK, b"", now))

    def _rcv_general(self, seg: Segment, now: float) -> None:
        """Every state after SYN-SENT, in RFC 9293 §3.10.7.4 order."""
        flags = seg.flags
        payload = seg.payload
        plen = len(payload)
        seq = seg.seq
        rcv_nxt = self.rcv_nxt
        st = self.state
        if flags & SYN and st is SYN_RECEIVED and seq == self.irs:
            if not flags & ACK:
                self._syn_needed = True  # the peer's SYN again: our SYN-ACK was lost
                return
            # Simultaneous open (RFC 9293 Figure 8): the SYN part is old, keep the rest.
            seq = (seq + 1) & MASK
            flags &= ~SYN
        # First: sequence number check.
        wnd = ((self._rcv_adv - rcv_nxt + HALF) & MASK) - HALF
        if wnd < 0:
            wnd = 0
        off = ((seq - rcv_nxt + HALF) & MASK) - HALF
        seglen = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        if off != 0:
            # A zero-length segment may sit at the right edge: a sender that filled
            # our window sends its ACKs from there (Linux accepts it too).
            ok = 0 <= off <= wnd if seglen == 0 else off + seglen > 0 and off < wnd
            if not ok:
                if flags & RST:
                    return
                if st is TIME_WAIT and flags & FIN:
                    self._tw_deadline = now + self.config.time_wait  # RFC 9293 §3.10.7.4
                if flags & SYN and st in SYNCHRONIZED:
                    self._challenge_ack(now)
                    return
                if off + seglen <= 0 and flags & ACK and st in SYNCHRONIZED:
                    # Entirely old (a retransmission, or an ACK sent from a SND.NXT that
                    # went back after a timeout): drop the text but keep the ACK, as BSD
                    # does; otherwise two such senders never hear each other's ACKs.
                    self._process_ack(seg, now)
                    if self.state is CLOSED:
                        return
                if seglen:
                    self._ack_now = True
                else:
                    # Answer an out-of-window pure ACK or window probe, rate-limited like
                    # a challenge ACK, so two confused ends cannot ACK each other forever.
                    self._challenge_ack(now)
                return
        tsv = seg.ts_val
        if (
            self._ts_ok
            and tsv is not None
            and off <= 0
            and ((tsv - self._ts_recent + HALF) & MASK) - HALF >= 0
        ):
            self._ts_recent = tsv
        # Second: RST (RFC 5961 §3.2: only an exact match resets).
        if flags & RST:
            if off != 0:
                self._challenge_ack(now)
                return
            self._transition(Input.RCV_RST)
            if st is SYN_RECEIVED:
                self._finish(CloseReason.REFUSED)
            elif st is TIME_WAIT or st is CLOSING:
                # RFC 9293 §3.10.7.4: no "connection reset" signal in these states; we
                # have the peer's FIN, so every byte both ways was delivered.
                self._finish(CloseReason.NORMAL)
            else:
                self._events.append(ConnectionReset())
                self._finish(CloseReason.RESET)
            return
        # Fourth: SYN (RFC 5961 §4.2: challenge ACK in every synchronized state).
        if flags & SYN:
            if st is SYN_RECEIVED and seq == self.irs:
                self._syn_needed = True  # our SYN-ACK was lost: send it again
                return
            self._challenge_ack(now)
            return
        # Fifth: ACK.
        if not flags & ACK:
            return
        if st is SYN_RECEIVED:
            if ((seg.ack - self.snd_una + HALF) & MASK) - HALF <= 0 or (
                (seg.ack - self.snd_max + HALF) & MASK
            ) - HALF > 0:
                self._out.append(Segment(self._lport, self._rport, seg.ack, 0, RST, 0))
                return
            self._transition(Input.RCV_ACK_OF_SYN)
            if self._rtt_seq is not None and self._retries == 0:
                self._rto.sample(now - self._rtt_time)
            self._rtt_seq = None
            self._retries = 0
            self._rto_deadline = None
            self.snd_una = (self.iss + 1) & MASK
            if ((self.snd_nxt - self.snd_una + HALF) & MASK) - HALF < 0:
                self.snd_nxt = self.snd_una
            self.snd_wnd = seg.window << self._snd_wscale
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self.snd_wl1 = seq
            self.snd_wl2 = seg.ack
            self._on_established()
            st = self.state
        if not self._process_ack(seg, now):
            return
        st = self.state
        if st is CLOSED:
            return
        # Seventh: segment text; eighth: FIN.
        if plen or flags & FIN:
            if st in RECEIVING:
                self._rcv_text(seq, payload, bool(flags & FIN), now)
            elif st is TIME_WAIT and flags & FIN:
                self._ack_now = True
                self._tw_deadline = now + self.config.time_wait

    def _process_ack(self, seg: Segment, now: float) -> bool:
        """The ACK field (RFC 9293 §3.10.7.4 "fifth"); False means drop the segment."""
        ack = seg.ack
        una = self.snd_una
        d = ((ack - una + HALF) & MASK) - HALF
        if d > 0:
            if ((ack - self.snd_max + HALF) & MASK) - HALF > 0:
                self._ack_now = True  # acks something not yet sent
                return False
            partial = self._new_ack(ack, d, now)
            if seg.sack_blocks and self._sack_ok:
                self._sack_board().add(seg.sack_blocks, ack, self.snd_max)
            if self._rexmit_log:
                self._rack(ack)
            if partial:
                # A partial ACK during recovery (RFC 6582 §3.2 step 5). Without SACK the
                # next segment is presumed lost. With SACK, only a known hole is (or
                # what `_rack` found); data merely queued on the way looks the same to
                # NewReno and would be sent twice.
                if not self._sack_ok:
                    if _sdiff(self._rexmit_next, ack) <= 0:
                        self._rexmit_next = ack
                        self._rexmit_budget += 1
                elif self._sack.ranges:
                    self._rexmit_budget += 1
        elif d == 0:
            if seg.window == 0:
                self._retries = 0  # a live peer with a closed window: keep probing
            news = False
            if seg.sack_blocks and self._sack_ok:
                news = self._sack_board().add(seg.sack_blocks, una, self.snd_max)
            if (
                self.snd_max != una
                and seg.window  # answers to window probes are not loss signals
                and not seg.payload
                and not seg.flags & FIN
                and ((seg.window << self._snd_wscale) == self.snd_wnd or news)
            ):
                self._dupack(now)
        elif d < -self.max_snd_wnd - 1:
            # RFC 5961 §5.2: an ACK too old to be plausible is answered and dropped.
            self._challenge_ack(now)
            return False
        # Window update (RFC 9293 §3.10.7.4, SND.WL1/WL2 rule).
        seq = seg.seq
        wl1 = ((seq - self.snd_wl1 + HALF) & MASK) - HALF
        if wl1 > 0 or (wl1 == 0 and ((ack - self.snd_wl2 + HALF) & MASK) - HALF >= 0):
            wnd = seg.window << self._snd_wscale
            if wnd != self.snd_wnd:
                old = self.snd_wnd
                self.snd_wnd = wnd
                if wnd > self.max_snd_wnd:
                    self.max_snd_wnd = wnd
                if wnd > old:
                    self._persist_deadline = None
                    self._persist_backoff = 0
            self.snd_wl1 = seq
            self.snd_wl2 = ack
        return True

    def _sack_board(self) -> SackScoreboard:
        """The connection's own scoreboard, made on first use (most never see a SACK)."""
        sack = self._sack
        if sack is _NO_SACK:
            sack = self._sack = SackScoreboard()
        return sack

    def _rack(self, ack: int) -> None:
        """Loss detection from acknowledged retransmissions (RFC 8985's idea, FIFO links).

        When a retransmission is cumulatively acknowledged, everything sent before it
        (below SND.MAX at that moment) has had its chance to arrive: if the segment at
        the new SND.UNA is still missing, is not itself a retransmission in flight and
        nothing above it was SACKed (the tail of a loss episode, where no duplicate ACKs
        can come), it was lost, and waiting for the probe or RTO timer only costs time.
        """
        lost_below: int | None = None
        keep = []
        for start, end, mark in self._rexmit_log:
            if _sdiff(end, ack) <= 0:
                if lost_below is None or _sdiff(mark, lost_below) > 0:
                    lost_below = mark
            else:
                keep.append((start, end, mark))
        self._rexmit_log = keep
        if lost_below is None or _sdiff(lost_below, ack) <= 0:
            return
        if any(_sdiff(start, ack) <= 0 < _sdiff(end, ack) for start, end, _ in keep):
            return  # the segment at SND.UNA was retransmitted after that one
        if self._sack.ranges:
            return  # SACK holes have their own repair (`_dupack`); this is for the tail
        self._rexmit_next = ack
        self._rexmit_budget = max(self._rexmit_budget, 1)

    def _new_ack(self, ack: int, acked: int, now: float) -> bool:
        """SND.UNA advances: free buffer, RTT sample, restart RTO, grow cwnd.

        Returns True for a partial ACK during recovery.
        """
        sbuf = self._sbuf
        if sbuf:  # (empty: the ACK covers only our SYN or FIN)
            base = self._sbuf_start
            n = ((ack - base + HALF) & MASK) - HALF
            if n > 0:
                if n > len(sbuf):
                    n = len(sbuf)
                del sbuf[:n]
                self._sbuf_start = (base + n) & MASK
        self.snd_una = ack
        if ((self.snd_nxt - ack + HALF) & MASK) - HALF < 0:
            self.snd_nxt = ack
        rtt_seq = self._rtt_seq
        if rtt_seq is not None and ((ack - rtt_seq + HALF) & MASK) - HALF > 0:
            self._rto.sample(now - self._rtt_time)
            self._rtt_seq = None
        self._retries = 0
        self._tlp_out = False
        snd_max = self.snd_max
        if ack == snd_max:
            self._rto_deadline = None  # RFC 6298 §5.2
            self._pto_deadline = None
            flight = 0
        else:
            self._rto_deadline = now + self._rto.rto  # §5.3
            self._arm_pto(now)
            flight = ((snd_max - ack + HALF) & MASK) - HALF
        self._ltx = 0
        partial = self._cc.on_new_ack(ack, acked, flight)
        sack = self._sack
        if sack.ranges:
            sack.prune(ack)
        if self._want_writable and len(sbuf) < self._sndbufsize:
            self._want_writable = False
            self._events.append(_WRITABLE_EVENT)
        if self._fin_queued and ((ack - self._fin_seq + HALF) & MASK) - HALF > 0:
            st = self.state
            if st is FIN_WAIT_1 or st is CLOSING or st is LAST_ACK:
                self._transition(Input.RCV_ACK_OF_FIN)
                st = self.state
                if st is CLOSED:
                    self._finish(CloseReason.NORMAL)
                elif st is TIME_WAIT:
                    self._enter_time_wait(now)
                elif st is FIN_WAIT_2 and self._app_closed:
                    self._tw_deadline = now + self.config.fin_wait_2_timeout
        return partial

    def _dupack(self, now: float) -> None:
        cc = self._cc
        smss = cc.smss
        sack = self._sack
        una = self.snd_una
        snd_max = self.snd_max
        flight = _sdiff(snd_max, una)
        unsent = _sdiff((self._sbuf_start + len(self._sbuf)) & MASK, self.snd_nxt)
        thresh = 3
        if unsent <= 0:
            # Early retransmit (RFC 5827 §3.1): with fewer than four segments out and
            # nothing new to send, three duplicate ACKs can never come.
            segs = (flight + smss - 1) // smss
            if segs < 4:
                thresh = max(1, segs - 1)
        # RFC 6675 §4 IsLost: three segments' worth SACKed above SND.UNA is as good as
        # three duplicate ACKs, even when ACKs were coalesced on the way.
        sack_lost = bool(sack.ranges) and sack.sacked_bytes() >= 3 * smss
        if cc.on_dupack(una, snd_max, flight, sack_lost, thresh):
            self._rexmit_next = una  # fast retransmit (RFC 5681 §3.2 step 4)
            self._rexmit_budget = 1
            self._pass_mark = snd_max
            self._ltx = 0
        elif cc.in_recovery:
            if sack.ranges:
                self._rexmit_budget += 1  # one more SACK hole per duplicate ACK
                if _sdiff(sack.ranges[-1][1], self._pass_mark) > 0:
                    # Data sent after our latest hole retransmission is being SACKed
                    # while holes remain below: those retransmissions were lost too (our
                    # links are FIFO, so no allowance for reordering). Go over the holes
                    # again: the idea of RFC 8985 RACK, by sequence rather than time.
                    self._rexmit_next = una
                    self._pass_mark = snd_max
        elif cc.dupacks <= 2 and unsent > 0:
            self._ltx = cc.dupacks  # limited transmit (RFC 3042): a new segment per dupack

    def _rcv_text(self, seq: int, payload: bytes | memoryview, fin: bool, now: float) -> None:
        """In-window text and FIN (RFC 9293 §3.10.7.4 "seventh" and "eighth")."""
        rcv_nxt = self.rcv_nxt
        off = ((seq - rcv_nxt + HALF) & MASK) - HALF
        plen = len(payload)
        if off < 0:  # trim what we already have
            payload = memoryview(payload)[-off:]
            plen += off
            off = 0
            seq = rcv_nxt
        room = ((self._rcv_adv - rcv_nxt + HALF) & MASK) - HALF - off
        if plen > room:  # trim what the window does not cover
            keep = max(room, 0)
            payload = memoryview(payload)[:keep]
            plen = keep
            fin = False
            self._ack_now = True
        if plen and self._app_closed:
            # RFC 1122 §4.2.2.13: data for a closed application means data loss: RST.
            self.abort(now)
            return
        if off > 0:
            if plen or fin:
                self._ooo_insert(seq, bytes(payload), fin)
            # Out of order: a duplicate ACK now, one per segment (RFC 5681 §4.2), even if
            # the owner feeds a whole batch before collecting output; coalesced into one
            # they would never reach the sender's threshold of three.
            self._out.append(self._make(self.snd_nxt, ACK, b"", now))
            return
        if plen:
            self._rbuf += payload
            rcv_nxt = (rcv_nxt + plen) & MASK
            self.rcv_nxt = rcv_nxt
            if self._ooo:
                self._ooo_drain()
                self._ack_now = True  # gap filled: ACK at once (RFC 5681 §4.2)
            self._data_arrived()
            self._segs_unacked += 1
            if (
                self._segs_unacked >= 2
                or ((self._rcv_adv - rcv_nxt + HALF) & MASK) - HALF < 2 * plen
            ):
                self._out.append(self._make(self.snd_nxt, ACK, b"", now))
            elif self._delack_deadline is None:
                self._delack_deadline = now + self.config.delayed_ack
            self._pushed = True  # only the slow path's rare callers get here; be prompt
        if fin or (self._ooo_fin is not None and self._ooo_fin == self.rcv_nxt):
            self._rcv_fin(now)

    def _rcv_fin(self, now: float) -> None:
        self.rcv_nxt = (self.rcv_nxt + 1) & MASK
        self._ooo_fin = None
        self._ooo.clear()
        self._eof = True
        delay = self.config.fin_ack_delay
        if self.state is ESTABLISHED and not self._fin_queued and delay > 0:
            # Entering CLOSE-WAIT: the application usually answers EOF by closing, so
            # the ACK waits (at most `fin_ack_delay`) for our FIN to carry it: one
            # segment instead of two (Linux, too, delays it: "pingpong" mode on FIN).
            deadline = self._delack_deadline
            if deadline is None or now + delay < deadline:
                self._delack_deadline = now + delay
        else:
            self._ack_now = True
        self._transition(Input.RCV_FIN)
        self._events.append(_EOF_EVENT)
        if self.state is TIME_WAIT:
            self._enter_time_wait(now)

    def _enter_time_wait(self, now: float) -> None:
        """RFC 9293 §3.10.7.4: cancel other timers, hold the 4-tuple for a while."""
        self._rto_deadline = None
        self._pto_deadline = None
        self._persist_deadline = None
        self._rexmit_budget = 0
        self._tw_deadline = now + self.config.time_wait

    def _ooo_insert(self, seq: int, data: bytes, fin: bool) -> None:
        """Keep a segment that arrived beyond a gap; overlaps are trimmed away."""
        rcv_nxt = self.rcv_nxt
        self._last_ooo = seq
        if fin:
            self._ooo_fin = (seq + len(data)) & MASK
        if not data:
            return
        a = _sdiff(seq, rcv_nxt)
        b = a + len(data)
        ooo = self._ooo
        keep: list[tuple[int, bytes]] = []
        for s, d in ooo:
            x = _sdiff(s, rcv_nxt)
            y = x + len(d)
            if a >= b or y <= a or x >= b:
                keep.append((s, d))
                continue
            if x <= a:  # existing covers our front
                data = data[y - a :]
                a = y
                keep.append((s, d))
            elif y >= b:  # existing covers our tail
                data = data[: x - a]
                b = x
                keep.append((s, d))
            # else: ours covers the existing one entirely; drop it
        if a < b:
            keep.append(((rcv_nxt + a) & MASK, data))
            keep.sort(key=lambda item: _sdiff(item[0], rcv_nxt))
        self._ooo = keep

    def _ooo_drain(self) -> None:
        """Move now-contiguous out-of-order segments into the receive buffer."""
        ooo = self._ooo
        rbuf = self._rbuf
        while ooo:
            s, d = ooo[0]
            off = _sdiff(s, self.rcv_nxt)
            if off > 0:
                break
            del ooo[0]
            end = len(d) + off
            if end > 0:
                rbuf += d[-off:] if off else d
                self.rcv_nxt = (self.rcv_nxt + end) & MASK

    # ------------------------------------------------------------------ lifecycle

    def _transition(self, inp: Input) -> None:
        old = self.state
        try:
            self.state = _TRANSITIONS[old, inp]
        except KeyError:
            self.state = next_state(old, inp)  # raises: the table has every valid pair
        if _trace:
            log.debug("%r: %s on %s", self, old.value, inp.value)

    def _finish(self, reason: CloseReason) -> None:
        """Enter CLOSED for good: drop timers and buffers, report the reason."""
        self.state = CLOSED
        self._rto_deadline = None
        self._persist_deadline = None
        self._delack_deadline = None
        self._tw_deadline = None
        self._pto_deadline = None
        self._syn_needed = False
        self._ack_now = False
        self._rexmit_budget = 0
        self._sbuf = bytearray()
        self._ooo = []
        self._events.append(_CLOSED_EVENTS[reason])

    def __repr__(self) -> str:
        return (
            f"<TCPConnection {self.local[0]}:{self.local[1]} -> {self.remote[0]}:"
            f"{self.remote[1]} {self.state.value}>"
        )
