"""Agent entry: the stdio pump, the configure handshake, and the data plane's start.

stdin carries frames from the manager; stdout carries frames to it.  Nothing else may write
to stdout, so fd 1 is redirected to stderr once the frame stream has its own descriptor: a
stray ``print`` in any part of the agent lands in the log, not in the data path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from norouter_trio import __version__, frames
from norouter_trio.agent import features as features_mod
from norouter_trio.messages import (
    ConfigureArgs,
    ConfigureResultData,
    MessageError,
    Request,
    Result,
    RouteSuggestion,
    decode_message,
    encode_message,
)

log = logging.getLogger("norouter_trio.agent")

#: Packets queued from stdin to the data plane, bounded in entries and in bytes (the
#: first limit reached applies). When full, the stdin reader waits: the back-pressure
#: reaches the manager's queue for this agent, which drops (like a router). 4 MiB is two
#: full windows of one connection; the manager queues 8 MiB more, the pipe 1 MiB.
INBOUND_PACKETS = 1024
INBOUND_BYTES = 4 << 20
#: Packets queued from the data plane to stdout; when full, the data plane waits (its
#: connections keep the data in their send buffers, which they hold anyway until it is
#: acknowledged: packets queued here are copies). 64 full-size segments are 4 MiB, four
#: writes of WRITE_BATCH_BYTES; 1024 let a bulk sender's agent grow by up to 64 MiB.
OUTBOUND_PACKETS = 64
#: Read size for stdin; big reads let one syscall carry many frames.
READ_SIZE = 1 << 20
#: Largest stdout write assembled from queued packets: the pipe's size, since a bigger
#: write blocks until the manager has read the first part anyway.
WRITE_BATCH_BYTES = 1 << 20
#: A write smaller than this first lets the tasks already runnable run once (one trio
#: scheduling pass, no waiting on I/O), so packets they produce in passing (a FIN right
#: after the data, the data right after an ACK) share the write: one wake-up of the
#: manager instead of two. A lone packet costs one pass (microseconds), not a timer.
COALESCE_BELOW = 64 << 10
#: Pipe buffer size asked for with F_SETPIPE_SZ (Linux; silently skipped elsewhere).
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


def _iov_max() -> int:
    """How many buffers one writev() takes (POSIX IOV_MAX is at least 16; Linux 1024)."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        n = -1
    return min(n, 1024) if n >= 16 else 16


_IOV_MAX = _iov_max()

_L3_HEAD = (frames.MAGIC << 24) | 4
_pack_header = struct.Struct(">IHH").pack


class ByteSink(Protocol):
    """Where the stdout writer's frames go when not straight to a descriptor (tests)."""

    async def send_all(self, data: bytes) -> None: ...


@dataclass
class AgentLink:
    """What the data plane gets: packet channels to and from the manager, and events."""

    inbound: trio.MemoryReceiveChannel[bytes]
    outbound: trio.MemorySendChannel[bytes]
    send_event: Callable[[RouteSuggestion], None]
    host_label: str


def pin_malloc_thresholds() -> None:
    """Serve buffers up to 4 MiB from the heap, not from fresh mmap()s (glibc; skipped
    elsewhere). Each stdin read allocates up to READ_SIZE and each relay read up to
    pump.CHUNK: above glibc's initial 128 KiB threshold every one of them would be an
    mmap + page faults on every page + munmap, which measured ~40 % more agent CPU per
    MB of bulk transfer. (glibc raises the threshold by itself only after it has freed a
    bigger mmap()ed block, which no longer happens here.) The trim threshold keeps the
    8 MiB glibc's own adjustment would pick, so RSS stays bounded.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (ImportError, OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 4 << 20)
    mallopt(m_trim_threshold, 8 << 20)


def raise_pipe_size(fd: int, size: int = PIPE_SIZE) -> None:
    """Grow a pipe's kernel buffer so each read/write moves more frames (best effort)."""
    try:
        import fcntl
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except (OSError, ImportError, ValueError):
        pass


class Agent:
    """One agent process: reads frames on ``in_fd``, writes frames on ``out_fd``."""

    def __init__(self, in_fd: int, out_fd: int, *, init_args: ConfigureArgs | None = None) -> None:
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._init_args = init_args
        self.configured: ConfigureArgs | None = None
        self.counters: dict[str, int] = {
            "frames_in": 0, "frames_out": 0, "dropped_not_configured": 0,
            "dropped_bad_packet": 0, "unknown_frames": 0,
        }
        self._control: list[bytes] = []  # encoded JSON frames waiting for the writer
        self._in_send, self._in_recv = trio.open_memory_channel[bytes](INBOUND_PACKETS)
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](OUTBOUND_PACKETS)
        self._wake = self._out_send.clone()  # b"" = "control frames are waiting"
        self._nursery: trio.Nursery | None = None
        self.exit_code = 0

    # -- control frames ---------------------------------------------------------------
    def _queue_control(self, payload: bytes) -> None:
        self._control.append(frames.encode_frame(frames.TYPE_JSON, payload))
        # When the queue is full the writer is busy and sees the frame on its next batch.
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError,
                                 trio.BrokenResourceError):
            self._wake.send_nowait(b"")

    def send_event(self, suggestion: RouteSuggestion) -> None:
        """Queue a routeSuggestion event to the manager; never blocks."""
        self._queue_control(encode_message(suggestion))

    def _reply(self, request_id: int, *, data: ConfigureResultData | None = None,
               error: str | None = None) -> None:
        res = (Result.failure(request_id, "configure", error) if error is not None
               else Result(request_id=request_id, op="configure", data=data))
        self._queue_control(encode_message(res))

    # -- tasks ------------------------------------------------------------------------
    async def run(self) -> int:
        raise_pipe_size(self._in_fd)
        raise_pipe_size(self._out_fd)
        # The pump does its own non-blocking reads and writes on the descriptors (no
        # FdStream): one scheduling pass less per read and per write, and writev.
        os.set_blocking(self._in_fd, False)
        os.set_blocking(self._out_fd, False)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._install_signal_handlers(nursery.cancel_scope)
            nursery.start_soon(self._write_stdout, self._out_fd)
            if self._init_args is not None:
                error = await self._configure(self._init_args)
                if error:
                    log.error("--debug-init-config: %s", error)
                    self.exit_code = 2
                    nursery.cancel_scope.cancel()
                    return self.exit_code
            await self._read_stdin(self._in_fd)
            nursery.cancel_scope.cancel()
        return self.exit_code

    def _install_signal_handlers(self, scope: trio.CancelScope) -> None:
        """SIGINT / SIGTERM (the manager stopping us) end the agent quietly with code 0.

        A plain handler that schedules the cancel through the trio token, rather than
        ``open_signal_receiver``, which re-raises a signal still queued when it closes.
        """
        token = trio.lowlevel.current_trio_token()

        def on_signal(signum: int) -> None:
            log.info("agent %s: got %s, exiting", self._label(), signal.Signals(signum).name)
            scope.cancel()

        def handler(signum: int, _frame: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(on_signal, signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

        def report(_signum: int, _frame: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._report_stacks)

        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, report)

    def _report_stacks(self) -> None:
        """SIGUSR1: log every connection's TCP state, to see which side a stalled transfer
        waits for (`kill -USR1 PID`; the lines reach the manager's log)."""
        from norouter_trio.tcp.netstack import NetStack

        stacks = NetStack.running()
        if not stacks:
            log.warning("agent %s: SIGUSR1: no network stack running yet", self._label())
        for stack in stacks:
            stack.log_report("SIGUSR1")

    def _label(self) -> str:
        return self.configured.me if self.configured is not None else "(unconfigured)"

    async def _read_stdin(self, fd: int) -> None:
        """Read frames from the manager and hand L3 packets to the data plane.

        Reads straight after handling a read (no scheduling pass first: while one read is
        handled the manager often writes the next); waits for readiness only on EAGAIN,
        and yields after two reads in a row so the data plane runs in between.
        """
        decoder = frames.FrameDecoder("manager (agent stdin)")
        in_send = self._in_send
        send_nowait = in_send.send_nowait
        counters = self.counters
        read = os.read
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        unyielded = 0  # reads since this task last let others run
        sizes: deque[int] = deque()  # sizes of the packets handed over, oldest first
        queued = 0  # bytes of those still in the channel (an upper bound)
        while True:
            try:
                data = read(fd, READ_SIZE)
            except BlockingIOError:
                await wait_readable(fd)
                unyielded = 0
                continue
            except OSError as e:
                log.error("agent %s: reading frames from stdin failed: %s; exiting",
                          self._label(), e)
                self.exit_code = 1
                return
            try:
                if not data:
                    decoder.eof()
                    log.debug("agent %s: EOF on stdin, exiting", self._label())
                    return
                received = decoder.feed(data)
            except frames.FrameError as e:
                log.error("agent %s: %s; exiting", self._label(), e)
                self.exit_code = 1
                return
            counters["frames_in"] += len(received)
            for ftype, payload in received:
                if ftype == frames.TYPE_L3:
                    if self.configured is None:
                        counters["dropped_not_configured"] += 1
                        continue
                    if not frames.is_ipv4_packet(payload):
                        counters["dropped_bad_packet"] += 1
                        continue
                    size = len(payload)
                    if queued + size > INBOUND_BYTES or len(sizes) >= INBOUND_PACKETS:
                        # (the second test keeps `sizes` as short as the channel)
                        queued = await self._inbound_room(sizes, queued, size)
                    try:
                        send_nowait(payload)
                    except trio.WouldBlock:
                        await in_send.send(payload)
                    sizes.append(size)
                    queued += size
                elif ftype == frames.TYPE_JSON:
                    await self._handle_json(payload)
                else:
                    counters["unknown_frames"] += 1
                    log.warning("agent %s: skipping a frame of unknown type %d (%d bytes)",
                                self._label(), ftype, len(payload))
            unyielded += 1
            if unyielded >= 2:
                await checkpoint()
                unyielded = 0

    async def _inbound_room(self, sizes: deque[int], queued: int, size: int) -> int:
        """Wait until `size` more bytes fit in the inbound channel's byte budget (always
        true when it is empty); return the bytes still queued. The channel is FIFO, so the
        packets the data plane has taken are the oldest `len(sizes) - used` entries."""
        statistics = self._in_send.statistics
        spins = 0
        while True:
            used = statistics().current_buffer_used
            while len(sizes) > used:
                queued -= sizes.popleft()
            if not sizes or queued + size <= INBOUND_BYTES:
                return queued
            # Rare (a burst bigger than the budget): let the data plane run, then look again.
            spins += 1
            await trio.sleep(0 if spins < 64 else 0.001)

    async def _handle_json(self, payload: bytes) -> None:
        try:
            msg = decode_message(payload)
        except MessageError as e:
            log.warning("agent %s: ignoring a bad JSON message from the manager: %s",
                        self._label(), e)
            if e.request_id is not None:
                self._reply(e.request_id, error=f"bad request: {e}")
            return
        if not isinstance(msg, Request):
            log.warning("agent %s: ignoring a %s message (agents only take requests)",
                        self._label(), type(msg).__name__)
            return
        if msg.op != "configure":
            log.warning("agent %s: unknown request op %r", self._label(), msg.op)
            self._reply(msg.id, error=f"unknown op {msg.op!r}")
            return
        if self.configured is not None:
            log.warning("agent %s: ignoring a second configure request", self._label())
            self._reply(msg.id, error=f"already configured (me={self.configured.me})")
            return
        if not isinstance(msg.args, ConfigureArgs):
            self._reply(msg.id, error="configure request without valid args")
            return
        error = await self._configure(msg.args)
        if error:
            self._reply(msg.id, error=error)
        else:
            self._reply(msg.id, data=ConfigureResultData(
                features=features_mod.features(), version=__version__))

    async def _configure(self, args: ConfigureArgs) -> str | None:
        """Start the data plane; return an error text instead of raising."""
        from norouter_trio.agent.dataplane import run_dataplane

        assert self._nursery is not None
        link = AgentLink(inbound=self._in_recv, outbound=self._out_send,
                         send_event=self.send_event, host_label=args.me)
        try:
            await self._nursery.start(run_dataplane, args, link)
        except Exception as e:  # the data plane failed to start: tell the manager why
            log.debug("agent %s: data plane failed to start", args.me, exc_info=True)
            return f"agent {args.me}: data plane failed to start: {e}"
        self.configured = args
        log.info("agent %s: configured (version %s, features %s)", args.me, __version__,
                 ",".join(features_mod.features()) or "none")
        return None

    async def _write_stdout(self, out: int | ByteSink) -> None:
        """Frame the queued packets and control frames into few writes.

        Writes at once what is queued (up to WRITE_BATCH_BYTES); a small batch first lets
        the already-runnable tasks run one pass (see COALESCE_BELOW). `out` is the stdout
        descriptor (non-blocking; written with writev, no copy), or a stream (tests).
        """
        recv = self._out_recv
        receive_nowait = recv.receive_nowait
        counters = self.counters
        pack = _pack_header
        head = _L3_HEAD
        l3 = frames.TYPE_L3
        coalesce_yield = trio.lowlevel.cancel_shielded_checkpoint
        write: Callable[[list[bytes]], Awaitable[None]]
        if isinstance(out, int):
            fd = out

            async def write(parts: list[bytes]) -> None:
                await _writev_all(fd, parts)
        else:
            async def write(parts: list[bytes]) -> None:
                await out.send_all(b"".join(parts))
        try:
            while True:
                try:
                    item = await recv.receive()
                except trio.EndOfChannel:
                    return
                parts: list[bytes] = []
                size = 0
                n = 0
                yielded = False
                ended = False
                while True:
                    if item:
                        parts.append(pack(head + len(item), l3, 0))
                        parts.append(item)
                        size += len(item) + 8
                        n += 1
                        if size >= WRITE_BATCH_BYTES:
                            break
                    try:
                        item = receive_nowait()
                    except trio.WouldBlock:
                        if yielded or size >= COALESCE_BELOW:
                            break
                        yielded = True
                        await coalesce_yield()
                        item = b""
                    except trio.EndOfChannel:
                        ended = True
                        break
                if self._control:
                    parts[:0] = self._control
                    n += len(self._control)
                    self._control = []
                if parts:
                    counters["frames_out"] += n
                    await write(parts)
                if ended:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("agent %s: stdout closed (%s)", self._label(), e)


async def _writev_all(fd: int, parts: list[bytes]) -> None:
    """Write every buffer in order on a non-blocking descriptor, waiting for room when the
    pipe is full. Errors become trio's: Broken (reader gone), Closed (descriptor closed)."""
    bufs: list[bytes | memoryview] = list(parts)
    i = 0
    count = len(bufs)
    writev = os.writev
    while i < count:
        try:
            n = writev(fd, bufs[i:i + _IOV_MAX])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        except OSError as e:
            if e.errno == errno.EBADF:
                raise trio.ClosedResourceError("stdout was closed") from None
            raise trio.BrokenResourceError(f"writing frames to stdout failed: {e}") from e
        while n:
            k = len(bufs[i])
            if n >= k:
                n -= k
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[n:]
                n = 0


def parse_init_config(text: str) -> ConfigureArgs:
    """``--debug-init-config JSON``: configure args as the manager would send them."""
    try:
        args = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--debug-init-config: not JSON: {e}") from None
    payload = json.dumps({"type": "request",
                          "body": {"id": 0, "op": "configure", "args": args}}).encode()
    try:
        msg = decode_message(payload)
    except MessageError as e:
        raise ValueError(f"--debug-init-config: {e}") from None
    if not isinstance(msg, Request) or not isinstance(msg.args, ConfigureArgs):
        raise ValueError("--debug-init-config: not valid configure args")
    return msg.args


def _claim_stdio() -> tuple[int, int]:
    """Give the frame streams private descriptors; point fd 1 at stderr for stray output."""
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    os.dup2(2, 1)
    return in_fd, out_fd


def run_agent(*, init_config: str | None = None) -> int:
    """Run the agent on this process's stdin/stdout until EOF or a signal; return the code."""
    init_args: Any = None
    if init_config is not None:
        try:
            init_args = parse_init_config(init_config)
        except ValueError as e:
            log.error("%s", e)
            return 2
    in_fd, out_fd = _claim_stdio()
    pin_malloc_thresholds()
    agent = Agent(in_fd, out_fd, init_args=init_args)
    try:
        return trio.run(agent.run)
    except Exception as e:  # a data-plane bug: one clear line, the traceback with --debug
        log.error("agent %s: stopped by an internal error: %r (run with --debug for the "
                  "traceback)", agent._label(), e)
        log.debug("traceback:", exc_info=True)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, signal.SIG_DFL)
        for fd in (in_fd, out_fd):
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)
