"""Agent entry: the stdio pump, the configure handshake, and the data plane's start.

stdin carries frames from the manager; stdout carries frames to it.  Nothing else may write
to stdout, so fd 1 is redirected to stderr once the frame stream has its own descriptor: a
stray ``print`` in any part of the agent lands in the log, not in the data path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

#: Packets queued from stdin to the data plane.  When full, the stdin reader waits: the
#: back-pressure reaches the manager's queue for this agent, which drops (like a router).
INBOUND_PACKETS = 1024
#: Packets queued from the data plane to stdout; when full, the data plane waits.
OUTBOUND_PACKETS = 1024
#: Read size for stdin; big reads let one syscall carry many frames.
READ_SIZE = 1 << 20
#: Largest stdout write assembled from queued packets.
WRITE_BATCH_BYTES = 4 << 20
#: Pipe buffer size asked for with F_SETPIPE_SZ (Linux; silently skipped elsewhere).
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031

_L3_HEAD = (frames.MAGIC << 24) | 4
_pack_header = struct.Struct(">IHH").pack


@dataclass
class AgentLink:
    """What the data plane gets: packet channels to and from the manager, and events."""

    inbound: trio.MemoryReceiveChannel[bytes]
    outbound: trio.MemorySendChannel[bytes]
    send_event: Callable[[RouteSuggestion], None]
    host_label: str


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
        stdin = trio.lowlevel.FdStream(self._in_fd)
        stdout = trio.lowlevel.FdStream(self._out_fd)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._install_signal_handlers(nursery.cancel_scope)
            nursery.start_soon(self._write_stdout, stdout)
            if self._init_args is not None:
                error = await self._configure(self._init_args)
                if error:
                    log.error("--debug-init-config: %s", error)
                    self.exit_code = 2
                    nursery.cancel_scope.cancel()
                    return self.exit_code
            await self._read_stdin(stdin)
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

    def _label(self) -> str:
        return self.configured.me if self.configured is not None else "(unconfigured)"

    async def _read_stdin(self, stdin: trio.lowlevel.FdStream) -> None:
        decoder = frames.FrameDecoder("manager (agent stdin)")
        send_nowait = self._in_send.send_nowait
        counters = self.counters
        while True:
            data = await stdin.receive_some(READ_SIZE)
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
                    elif not frames.is_ipv4_packet(payload):
                        counters["dropped_bad_packet"] += 1
                    else:
                        try:
                            send_nowait(payload)
                        except trio.WouldBlock:
                            await self._in_send.send(payload)
                elif ftype == frames.TYPE_JSON:
                    await self._handle_json(payload)
                else:
                    counters["unknown_frames"] += 1
                    log.warning("agent %s: skipping a frame of unknown type %d (%d bytes)",
                                self._label(), ftype, len(payload))

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

    async def _write_stdout(self, stdout: trio.lowlevel.FdStream) -> None:
        """Batch queued packets and control frames into few large writes."""
        recv = self._out_recv
        receive_nowait = recv.receive_nowait
        counters = self.counters
        try:
            async for first in recv:
                parts: list[bytes] = []
                size = 0
                item: bytes | None = first
                n = 0
                while item is not None:
                    if item:
                        parts.append(_pack_header(_L3_HEAD + len(item), frames.TYPE_L3, 0))
                        parts.append(item)
                        size += len(item) + 8
                        n += 1
                    if size >= WRITE_BATCH_BYTES:
                        break
                    try:
                        item = receive_nowait()
                    except trio.WouldBlock:
                        item = None
                if self._control:
                    parts[:0] = self._control
                    n += len(self._control)
                    self._control = []
                if parts:
                    counters["frames_out"] += n
                    await stdout.send_all(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("agent %s: stdout closed (%s)", self._label(), e)


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
    agent = Agent(in_fd, out_fd, init_args=init_args)
    try:
        return trio.run(agent.run)
    except Exception as e:  # a data-plane bug: one clear line, the traceback with --debug
        log.error("agent %s: stopped by an internal error: %r (run with --debug for the "
                  "traceback)", agent._label(), e)
        log.debug("traceback:", exc_info=True)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        for fd in (in_fd, out_fd):
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)
