"""Events a sans-IO `TCPConnection` reports through `next_event()`.

The layer above (the trio `NetStack`) turns them into wake-ups of blocked readers and
writers; none carries data, because data is pulled with `TCPConnection.read`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CloseReason(str, enum.Enum):
    """Why a connection reached CLOSED."""

    NORMAL = "normal"  # both FINs exchanged (or our side closed before the handshake)
    RESET = "reset"  # RST received in a synchronized state, or we aborted
    TIMEOUT = "timeout"  # too many retransmissions (user timeout, RFC 9293 §3.8.3)
    REFUSED = "refused"  # RST answering our SYN


@dataclass(frozen=True, slots=True)
class Established:
    """The three-way handshake completed (RFC 9293 §3.5)."""


@dataclass(frozen=True, slots=True)
class DataAvailable:
    """New in-order bytes are readable; not repeated until this one is taken."""


@dataclass(frozen=True, slots=True)
class EOFReceived:
    """The peer's FIN was reached in sequence: no more data will arrive."""


@dataclass(frozen=True, slots=True)
class Writable:
    """Send-buffer room freed after a `send()` that filled the buffer or was cut short."""


@dataclass(frozen=True, slots=True)
class ConnectionReset:
    """The peer reset a synchronized connection; `ConnectionClosed(RESET)` follows.

    Not reported for a refused SYN (only `ConnectionClosed(REFUSED)`), nor in CLOSING or
    TIME-WAIT, where both FINs were already exchanged (RFC 9293 §3.10.7.4).
    """


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Final event: the connection is CLOSED and may be forgotten."""

    reason: CloseReason


Event = Established | DataAvailable | EOFReceived | Writable | ConnectionReset | ConnectionClosed
