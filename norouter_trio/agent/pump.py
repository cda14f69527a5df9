"""Joining two byte streams: a pump per direction, half-close carried through, resets passed on.

Each direction reads one chunk and waits until the other side has taken it before reading
the next, so a reader that stops makes the writer stop too (back-pressure end to end: at
most one chunk per direction is held here). EOF on one side becomes ``send_eof`` on the
other while the opposite direction keeps flowing. A reset or error on either side aborts
both (an RST where the stream supports it), so the far end learns promptly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from norouter_trio.tcp.netstack import TCPStream

#: Largest chunk moved per receive/send: big enough that per-call overhead stays small,
#: small enough that a stalled reader pins little memory.
CHUNK = 256 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)

#: What a broken connection raises, from trio streams and from the OS.
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class JoinResult:
    """How a joined connection ended: bytes each way, and the error that ended it, if any."""

    a_to_b: int = 0
    b_to_a: int = 0
    error: str | None = None


def abort_stream(stream: trio.abc.Stream) -> None:
    """Arrange for the next close to send RST instead of FIN (OS socket or stack stream)."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        return
    abort = getattr(stream, "abort", None)
    if callable(abort):
        with contextlib.suppress(*STREAM_ERRORS):
            abort()


def read_available(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """The bytes already waiting on an OS stream (b"" when none, or at EOF: a later read
    sees the EOF again), without waiting. OSError if the peer reset it."""
    try:
        return os.read(stream.socket.fileno(), max_bytes)
    except BlockingIOError:
        return b""


async def reset_and_close(stream: trio.abc.Stream) -> None:
    """Close with RST: the far end sees a reset, not a clean end of data."""
    abort_stream(stream)
    with contextlib.suppress(*STREAM_ERRORS):
        await trio.aclose_forcefully(stream)


async def pump(src: trio.abc.ReceiveStream, dst: trio.abc.SendStream, *,
               chunk: int = CHUNK) -> int:
    """Copy src to dst until EOF, then half-close dst; return the bytes moved.

    An OS socket on one side is read or written directly on its descriptor (non-blocking
    read/write, waiting for readiness only on EAGAIN): trio's SocketStream yields once
    after every successful call, one scheduling pass per chunk that a relay does not need
    since the other side's call yields anyway (the stack stream checkpoints on every
    call). When both sides are OS sockets only the receiving side is direct. From an OS
    socket to a stack stream, a short read peeks for EOF: if the peer has closed, the last
    data and the FIN go in one call (`TCPStream.send_last`), so in one segment.
    """
    moved = 0
    receive_some: Callable[[int], Awaitable[bytes | bytearray]] = src.receive_some
    send_all: Callable[[bytes | bytearray], Awaitable[None]] = dst.send_all
    # A stack stream takes the last data and the FIN in one call (one segment less per
    # request/response connection): a short read from an OS socket peeks for EOF.
    send_last: Callable[[bytes | bytearray], Awaitable[None]] | None = getattr(
        dst, "send_last", None)
    at_eof: Callable[[], bool] | None = None
    # A stack stream on either side is read / finished without schedule points when it
    # need not wait (`receive_now`, `try_send_last`): the task yields anyway when it
    # next waits, or ends. Each saves a task step per connection. (Bounded: reading
    # without yielding stops once the stack's receive buffer is empty.)
    receive_now: Callable[[int], bytes | None] | None = None
    try_send_last: Callable[[bytes | bytearray], bool] | None = None
    if type(src) is TCPStream:
        receive_now = src.receive_now
    if type(dst) is TCPStream:
        try_send_last = dst.try_send_last
    if type(src) is trio.SocketStream:
        receive_some = direct_receiver(src.socket.fileno())
        if send_last is not None:
            at_eof = _eof_peeker(src.socket)
        # Reads in whole segments of the stack stream: a 256 KiB read is 4 full segments
        # and a 212-byte runt otherwise (Nagle is off in a relay: it would go alone).
        seg = int(getattr(dst, "segment_size", 0))
        if 0 < seg < chunk:
            chunk -= chunk % seg
    elif type(dst) is trio.SocketStream:
        send_all = direct_sender(dst.socket.fileno())
    while True:
        data: bytes | bytearray | None = (
            receive_now(chunk) if receive_now is not None else None)
        if data is None:
            data = await receive_some(chunk)
        if not data:
            break
        if at_eof is not None and send_last is not None and len(data) < chunk and at_eof():
            if try_send_last is None or not try_send_last(data):
                await send_last(data)
            return moved + len(data)
        await send_all(data)
        moved += len(data)
    if type(dst) is trio.SocketStream:
        dst.socket.shutdown(socket.SHUT_WR)  # send_eof() without its schedule point
    elif try_send_last is not None and try_send_last(b""):
        pass
    elif isinstance(dst, trio.abc.HalfCloseableStream):
        await dst.send_eof()
    else:
        await dst.aclose()
    return moved


def _eof_peeker(sock: trio.socket.SocketType) -> Callable[[], bool]:
    """True when the socket's next read would return EOF (peeks, never waits). A reset
    raises its OSError here: the kernel reports it once, and the next read would then
    return a plain EOF, passing the reset on as a clean end."""
    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
    inner: Any = getattr(sock, "_sock", None)  # trio's wrapped stdlib socket, if visible
    recv = getattr(inner, "recv", None)

    def at_eof() -> bool:
        if recv is None:
            return False
        try:
            return not recv(1, flags)
        except BlockingIOError:  # nothing more yet
            return False

    return at_eof


def direct_receiver(fd: int) -> Callable[[int], Awaitable[bytes]]:
    """`receive_some` on an OS socket's descriptor: waits in trio only on EAGAIN."""
    read = os.read
    wait_readable = trio.lowlevel.wait_readable

    async def receive_some(max_bytes: int) -> bytes:
        while True:
            try:
                return read(fd, max_bytes)
            except BlockingIOError:
                await wait_readable(fd)

    return receive_some


def direct_sender(fd: int) -> Callable[[bytes | bytearray], Awaitable[None]]:
    """`send_all` on an OS socket's descriptor: waits in trio only on EAGAIN."""
    write = os.write
    wait_writable = trio.lowlevel.wait_writable

    async def send_all(data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            try:
                n = write(fd, view)
            except BlockingIOError:
                await wait_writable(fd)
                continue
            view = view[n:]

    return send_all


async def join(a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream, *,
               chunk: int = CHUNK) -> JoinResult:
    """Pump a<->b until both directions end; close both. Never raises for stream errors:
    an error in one direction resets both streams and is returned in ``error``."""
    result = JoinResult()

    async def direction(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream,
                        forward: bool, scope: trio.CancelScope) -> None:
        try:
            n = await pump(src, dst, chunk=chunk)
        except STREAM_ERRORS as e:
            if result.error is None:
                result.error = f"{'a->b' if forward else 'b->a'}: {e or type(e).__name__}"
            abort_stream(a)
            abort_stream(b)
            scope.cancel()
            return
        if forward:
            result.a_to_b = n
        else:
            result.b_to_a = n

    try:
        async with trio.open_nursery() as nursery:
            # One direction in a task of its own, the other in this one: a task less to
            # spawn per connection (at hundreds of connections a second it shows).
            nursery.start_soon(direction, b, a, False, nursery.cancel_scope)
            await direction(a, b, True, nursery.cancel_scope)
    finally:
        # Closing never waits here (both stream kinds close at once, FIN after queued
        # data, or RST once aborted), so both get closed even while the agent is
        # shutting down: synchronously when the stream allows it (no cancel scope and
        # cancelled checkpoint per stream, as aclose_forcefully costs).
        for s in (a, b):
            if not close_now(s):
                with contextlib.suppress(*STREAM_ERRORS):
                    await trio.aclose_forcefully(s)
    return result


def close_now(stream: trio.abc.AsyncResource) -> bool:
    """Close an OS socket stream or a stack stream without awaiting (what their aclose()
    does before its checkpoint); False for other kinds, which need aclose()."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return True
    if isinstance(stream, TCPStream):
        stream.close()
        return True
    return False
