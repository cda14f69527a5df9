"""Every TCP state transition, as one table (RFC 9293 §3.3.2, Figure 5).

Theory of operation
-------------------
`TCPConnection` never assigns its state directly: it decides which *input* happened
(a SYN arrived, our FIN was acknowledged, the application shut down writing, ...) and asks
`next_state(state, input)`. Anything not in the table is a bug in the caller and raises
`TCPStateError`, so an impossible transition cannot pass silently.

Inputs are recognised by the connection in the order of RFC 9293 §3.10.7.4 (sequence
check, RST, SYN, ACK, text, FIN), so one segment can cause several transitions in turn,
e.g. a FIN that also acknowledges our FIN takes FIN-WAIT-1 → FIN-WAIT-2 → TIME-WAIT.

Inputs valid in every state but CLOSED (RST accepted, abort, user timeout) are listed in
`_ANY_STATE` rather than repeated per state.
"""

from __future__ import annotations

import enum


class TCPState(enum.Enum):
    # Identity hash in C: set membership tests (`state in SENDING`) sit on the hot path.
    __hash__ = object.__hash__

    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"


class Input(enum.Enum):
    __hash__ = object.__hash__

    ACTIVE_OPEN = "active open"  # connect(): our SYN goes out
    PASSIVE_OPEN = "passive open"  # a listener hands over
    RCV_SYN = "SYN received"  # LISTEN, or simultaneous open in SYN-SENT
    RCV_SYN_ACK = "SYN-ACK received"
    RCV_ACK_OF_SYN = "ACK of our SYN received"
    APP_SHUTDOWN = "application shut down writing"  # our FIN is queued after the data
    RCV_FIN = "FIN received in sequence"
    RCV_ACK_OF_FIN = "ACK of our FIN received"
    TIME_WAIT_EXPIRED = "TIME-WAIT timer expired"  # RFC 9293 §3.6 (2*MSL, ours is short)
    APP_CLOSE_EARLY = "application closed before the handshake finished"
    RCV_RST = "acceptable RST received"
    APP_ABORT = "application aborted"
    GIVE_UP = "user timeout: too many retransmissions"


S = TCPState
I = Input  # noqa: E741

_TRANSITIONS: dict[tuple[TCPState, Input], TCPState] = {
    (S.CLOSED, I.ACTIVE_OPEN): S.SYN_SENT,
    (S.CLOSED, I.PASSIVE_OPEN): S.LISTEN,
    (S.LISTEN, I.RCV_SYN): S.SYN_RECEIVED,
    (S.SYN_SENT, I.RCV_SYN_ACK): S.ESTABLISHED,
    (S.SYN_SENT, I.RCV_SYN): S.SYN_RECEIVED,  # simultaneous open (RFC 9293 Figure 8)
    (S.SYN_SENT, I.APP_CLOSE_EARLY): S.CLOSED,
    (S.SYN_RECEIVED, I.RCV_ACK_OF_SYN): S.ESTABLISHED,
    (S.ESTABLISHED, I.APP_SHUTDOWN): S.FIN_WAIT_1,
    (S.ESTABLISHED, I.RCV_FIN): S.CLOSE_WAIT,
    (S.CLOSE_WAIT, I.APP_SHUTDOWN): S.LAST_ACK,
    (S.FIN_WAIT_1, I.RCV_ACK_OF_FIN): S.FIN_WAIT_2,
    (S.FIN_WAIT_1, I.RCV_FIN): S.CLOSING,  # simultaneous close (RFC 9293 Figure 13)
    (S.FIN_WAIT_2, I.RCV_FIN): S.TIME_WAIT,
    (S.CLOSING, I.RCV_ACK_OF_FIN): S.TIME_WAIT,
    (S.LAST_ACK, I.RCV_ACK_OF_FIN): S.CLOSED,
    (S.TIME_WAIT, I.TIME_WAIT_EXPIRED): S.CLOSED,
}

# RFC 9293 §3.10.7.4 "second, check the RST bit" and §3.10.5 ABORT: from any state.
_ANY_STATE: dict[Input, TCPState] = {
    I.RCV_RST: S.CLOSED,
    I.APP_ABORT: S.CLOSED,
    I.GIVE_UP: S.CLOSED,
}

#: States in which both sides have seen the other's ISN (RFC 9293 §3.10.7.4).
SYNCHRONIZED = frozenset(
    {
        S.ESTABLISHED,
        S.FIN_WAIT_1,
        S.FIN_WAIT_2,
        S.CLOSE_WAIT,
        S.CLOSING,
        S.LAST_ACK,
        S.TIME_WAIT,
    }
)
#: States whose send side may still carry (re)transmitted data or our FIN.
SENDING = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK})
#: States in which the application may still queue data with `send()`.
APP_CAN_SEND = frozenset({S.SYN_SENT, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT})
#: States in which segment text is accepted (RFC 9293 §3.10.7.4 "seventh").
RECEIVING = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})


class TCPStateError(RuntimeError):
    """An operation is not valid in the connection's current state."""


def next_state(state: TCPState, inp: Input) -> TCPState:
    """The state after `inp` in `state`; raises `TCPStateError` if the table has none."""
    new = _TRANSITIONS.get((state, inp))
    if new is not None:
        return new
    if state is not S.CLOSED and inp in _ANY_STATE:
        return _ANY_STATE[inp]
    raise TCPStateError(f"no TCP transition from {state.value} on {inp.value}")


def transitions() -> dict[tuple[TCPState, Input], TCPState]:
    """The full table (explicit entries plus the any-state ones), for tests and docs."""
    table = dict(_TRANSITIONS)
    for st in TCPState:
        if st is not S.CLOSED:
            for inp, new in _ANY_STATE.items():
                table.setdefault((st, inp), new)
    return table
