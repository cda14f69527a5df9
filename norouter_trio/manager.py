"""The manager: starts one agent per host, configures it, and switches L3 frames between them.

Per agent link, one task group: the process, a stdin writer fed by a bounded channel, a stdout
reader that switches frames, and a stderr relay (``stderr[NAME(VIP)]: LINE``).

Switching (behaviour.md §5) works on whole read chunks: the reader parses every frame in a
chunk (``FrameDecoder.feed_raw``), picks the destination agent from ``packet[16:20]``, and
forwards runs of consecutive frames for the same agent as one slice of the chunk, so a
chunk of frames for one host costs one queue entry and one ``write``.

Request/response traffic (a few small frames per wake-up) is dominated by wake-ups, not
bytes, so the reader skips the queue when it can: if the destination's queue is empty
and nobody is writing its pipe, the reader writes the frames itself with one
non-blocking ``writev`` (no hand-off to the writer task, no extra scheduler batch).  Only
what the pipe does not take becomes the head of the (empty) queue, still in order, for
the writer.  ``Pipe.read`` passes one scheduling point per call (the wait for data, or a
checkpoint when it did not wait), not two.

Large frames (16 KiB and more, Linux) skip user space: when the frames at the head of an
agent's stdout pipe are large, whole, and for one destination whose queue is empty and
whose stdin nobody is writing, the reader moves the run with one ``splice`` into that
agent's stdin pipe (page references, no copy).  It sees the headers through ``tee`` into
a private pipe, so per frame it makes two syscalls on that pipe and copies 28 bytes.  A
run never interleaves with the writer (one writer per pipe at a time, ``Pipe.busy``) and
never overtakes frames queued before it (the reader waits up to ``SPLICE_WAIT`` for the
queue to drain, else copies).  Packet observers turn splicing off (they see every packet).

Full queues: each agent's queue is bounded in entries (``QUEUE_BATCHES``) and in bytes
(``queue_bytes``, 8 MiB by default).  When a destination's queue is full, the reader of
the source that sent the frames waits up to ``BACKPRESSURE_WAIT`` (0.25 s) for room, so
an agent that is merely slower slows its senders down instead of losing packets.  If the
queue stays full, the frames are dropped and counted (``drops["queue_full"]`` on the
destination) and the destination is marked congested: frames for it are dropped at once,
like a router's output queue, until its queue drains to half.  So a stuck agent stalls
its senders at most once for 0.25 s, never the readers of other agents, and the memory
it can hold is bounded.  TCP in the agents recovers the loss.  A splice that finds the
destination's pipe full waits the same 0.25 s for room; then the rest of its run (already
in the source pipe, at most a pipe's worth) is read into ``tail``, which the destination's
writer sends before anything queued after it (a frame cut in the middle cannot be
dropped), and the destination is marked congested.

Shutdown: agents get SIGINT (to their process group) and EOF on stdin, and are SIGKILLed
after ``grace`` seconds.  Local children also get PR_SET_PDEATHSIG, so a SIGKILLed manager
takes them along; remote agents see EOF on stdin and exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from norouter_trio import __version__, frames
from norouter_trio.manifest import HostSpec, Manifest, configure_args
from norouter_trio.messages import (
    ConfigureArgs,
    Event,
    MessageError,
    Request,
    Result,
    RouteSuggestion,
    decode_message,
    encode_message,
)
from norouter_trio.routing import RoutingTable, ip_bytes, ip_str

log = logging.getLogger("norouter_trio.manager")

#: Entries (batches of frames) queued per agent before frames for it are dropped.
QUEUE_BATCHES = 1024
#: Bytes queued per agent before frames for it are dropped.
QUEUE_BYTES = 8 << 20
#: One read from an agent's stdout; big reads carry many frames per syscall.
READ_SIZE = 1 << 20
#: Largest single write to an agent's stdin.
WRITE_BATCH_BYTES = 4 << 20
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
STDERR_KEEP = 20
#: Seconds between two "no route" warnings (the rest are counted).
NO_ROUTE_WARN_INTERVAL = 5.0
#: Features whose absence is worth a warning when the host's configuration uses them.
OPTIONAL_FEATURES = ("http", "socks", "etchosts", "routes", "dns")

#: Seconds without a configure result before the manager warns.
CONFIGURE_WARN_AFTER = 30.0
#: How long a source's reader waits for room in a full destination queue before it drops
#: the frames and marks the destination congested.
BACKPRESSURE_WAIT = 0.25


_Blocked = tuple["HostState", list[bytes | memoryview], int]


class Observer:
    """Callbacks for watchers such as the debug relay; every method is a no-op here.

    ``host`` arguments are :class:`HostState` objects.  ``frame_switched`` and
    ``frame_dropped`` run on the packet path for every frame: do O(1) work, never block.
    """

    def agent_starting(self, host: HostState, argv: list[str]) -> None:
        pass

    def agent_configured(self, host: HostState, features: list[str], version: str) -> None:
        pass

    def agent_warning(self, host: HostState, msg: str) -> None:
        pass

    def agent_exited(self, host: HostState, code: int | None,
                     last_stderr_lines: list[str]) -> None:
        pass

    def agent_stderr(self, host: HostState, line: str) -> None:
        pass

    def frame_switched(self, src_host: HostState, dst_host: HostState, packet: bytes) -> None:
        pass

    def frame_dropped(self, src_host: HostState, reason: str, packet: bytes) -> None:
        pass

    def route_learned(self, ips: list[str], via: str) -> None:
        pass


@dataclass(eq=False)
class HostState:
    """One agent link as the relay and the logs see it."""

    name: str
    vip: str
    spec: HostSpec
    request_id: int
    argv: list[str] = field(default_factory=list)
    state: str = "starting"  # starting / ready / exited
    features: list[str] = field(default_factory=list)
    version: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    exit_reason: str | None = None
    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    queued_bytes: int = 0
    last_stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_KEEP))
    # runtime
    process: subprocess.Popen[bytes] | None = None
    stdin: Pipe | None = None
    send: trio.MemorySendChannel[tuple[list[bytes | memoryview], int, int]] | None = None
    terminating: bool = False
    congested: bool = False  # queue stayed full: drop at once until it drains to half
    tail: bytes = b""  # end of a spliced frame that did not fit: the writer sends it first
    tee: _TeePipe | None = None  # the reader's look-ahead pipe (splice mode)
    room: trio.Event = field(default_factory=trio.Event)  # set when the writer dequeues
    terminate_requested: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def label(self) -> str:
        return f"{self.name}({self.vip})"

    @property
    def queue_depth(self) -> int:
        """Entries waiting in this agent's queue."""
        if self.send is None:
            return 0
        return self.send.statistics().current_buffer_used

    def counters(self) -> dict[str, Any]:
        return {"frames_in": self.frames_in, "bytes_in": self.bytes_in,
                "frames_out": self.frames_out, "bytes_out": self.bytes_out,
                "drops": dict(self.drops), "queue_depth": self.queue_depth,
                "queued_bytes": self.queued_bytes}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vip": self.vip, "argv": list(self.argv),
                "state": self.state, "features": list(self.features),
                "version": self.version, "pid": self.pid, "exit_code": self.exit_code,
                "exit_reason": self.exit_reason, "counters": self.counters()}

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int) -> None:
    """In the child before exec: own process group; die with the manager (Linux)."""
    os.setpgid(0, 0)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the manager died before prctl took effect
            os._exit(1)


IOV_MAX = 1024
#: Frames at least this long are spliced pipe to pipe when the whole frame is in the
#: source pipe and the destination is idle (Linux ``splice``; elsewhere never).
SPLICE_MIN = 16 << 10
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
#: What a reader needs of a frame to route it: the frame header and the IPv4 header up
#: to the destination address.
PEEK_SIZE = frames.HEADER_LEN + 20
#: A reader holding a large frame waits this long at most for frames queued before it to
#: reach the destination (and only if that much is queued), so that it can splice it.
SPLICE_WAIT = 0.005
SPLICE_WAIT_BYTES = 2 * READ_SIZE
_INT0 = bytes(4)
#: Python's interactive prompts (``sys.ps1``, ``sys.ps2``), all four bytes long.
_PROMPTS = (b">>> ", b"... ")
_WORD = struct.Struct(">IH")  # a frame's magic + length word and its type


def _load_tee() -> Any:
    if not hasattr(os, "splice"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.tee
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


_tee = _load_tee()


class _TeePipe:
    """A private pipe that ``tee`` fills with a copy of a source pipe's contents (page
    references, not bytes), so that a reader can look at frame headers without taking
    them out of the source."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        _raise_pipe_size(self.w)
        self.null = os.open(os.devnull, os.O_WRONLY)

    def tee_from(self, fd: int) -> int | None:
        """Duplicate up to a pipe's worth of ``fd``; None when ``fd`` is empty (wait)."""
        n = _tee(fd, self.w, PIPE_SIZE, _SPLICE_FLAGS)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                return None
            raise OSError(err, os.strerror(err))
        return int(n)

    def discard(self, n: int) -> None:
        while n > 0:
            moved = os.splice(self.r, self.null, n, flags=_SPLICE_FLAGS)
            if moved <= 0:
                raise OSError("the tee pipe ended early")
            n -= moved

    def close(self) -> None:
        for fd in (self.r, self.w, self.null):
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_exactly(fd: int, n: int) -> bytes:
    """``n`` bytes that are already in the pipe ``fd`` (FIONREAD said so)."""
    parts = []
    while n > 0:
        data = os.read(fd, n)
        if not data:
            raise OSError("the source pipe ended inside a frame")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


class Pipe:
    """Our end of a pipe to or from an agent, for trio: plain reads, gathered writes.

    Unlike ``trio.lowlevel.FdStream`` it writes a list of buffers with one ``writev``
    (no join copy) and hands read chunks to the caller as they come.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.closed = False
        #: Someone is writing to this pipe: the link's writer, or a reader splicing one
        #: frame straight in.  Frames must not interleave, so there is one at a time.
        self.busy = False
        self._released = trio.Event()
        self._drained = False  # the last read was short: wait before the next one

    def acquire_nowait(self) -> None:
        assert not self.busy
        self.busy = True

    def release(self) -> None:
        self.busy = False
        self._released.set()
        self._released = trio.Event()

    async def wait_released(self) -> None:
        """Wait for the next ``release``."""
        await self._released.wait()

    async def wait_idle(self) -> None:
        """Wait until nobody is writing (only for the link's writer: readers never wait)."""
        while self.busy:
            await self._released.wait()

    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes``; b"" at EOF.

        Every call passes exactly one scheduling point, so a busy pipe cannot starve the
        other tasks: the wait for data, or else a (cancel-shielded) checkpoint after the
        read, so that a cancelled read takes nothing out of the pipe.  A quiet pipe
        (request/response traffic) thus costs one wake-up per read, not two.  After a
        short read the pipe was empty, so the next call waits first instead of trying a
        read that would fail with EAGAIN."""
        if self._drained:
            self._drained = False
            await trio.lowlevel.wait_readable(self.fd)
            waited = True
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
        while True:
            if self.closed:
                raise trio.ClosedResourceError("pipe closed")
            try:
                data = os.read(self.fd, max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
                waited = True
                continue
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            self._drained = 0 < len(data) < max_bytes
            return data

    def write_nowait(self, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """Write what the pipe takes now, in order, without waiting; return the rest
        (empty when all of it went).  Raises BrokenResourceError when the reader left."""
        i = 0
        while i < len(parts):
            if self.closed:
                raise trio.ClosedResourceError("pipe closed")
            try:
                n = os.writev(self.fd, parts[i:i + IOV_MAX])
            except BlockingIOError:
                break
            except (BrokenPipeError, ConnectionResetError) as e:
                raise trio.BrokenResourceError(str(e)) from e
            while i < len(parts) and n >= len(parts[i]):
                n -= len(parts[i])
                i += 1
            if n:
                parts[i] = memoryview(parts[i])[n:]
                break  # a short write: the pipe is full
        return parts[i:]

    async def write(self, parts: list[bytes | memoryview], *, checkpoint: bool = True,
                    ) -> None:
        """Write every buffer, in order; raises BrokenResourceError when the reader left.

        Passes a scheduling point (a wait for room, or a final checkpoint), unless
        ``checkpoint`` is false and the pipe took everything at once: for a caller whose
        next step is a checkpoint anyway."""
        waited = False
        while True:
            parts = self.write_nowait(parts)
            if not parts:
                break
            await trio.lowlevel.wait_writable(self.fd)
            waited = True
        if checkpoint and not waited:
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)


def _overrides(observer: object, method: str) -> bool:
    fn = getattr(type(observer), method, None)
    return fn is not None and fn is not getattr(Observer, method)


def _raise_pipe_size(fd: int) -> None:
    try:
        import fcntl
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, ImportError, ValueError):
        pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Manager:
    """Runs the agents of one manifest and the switch between them."""

    def __init__(self, manifest: Manifest, *, grace: float = 2.0,
                 queue_bytes: int = QUEUE_BYTES, debug: bool = False) -> None:
        self.manifest = manifest
        self.grace = grace
        self.queue_bytes = queue_bytes
        self.debug = debug
        specs = list(manifest.hosts.values())
        self.hosts: list[HostState] = [
            HostState(name=h.name, vip=h.vip, spec=h, request_id=i + 1)
            for i, h in enumerate(specs)]
        self.configure: dict[str, ConfigureArgs] = {
            h.name: configure_args(manifest, h.name) for h in specs}
        self.routing = RoutingTable(h.vip for h in self.hosts)
        for route in manifest.routes:
            for cidr in route.to_cidr:
                self.routing.add_cidr_route(cidr, route.via)
        self._by_vip_all: dict[bytes, HostState] = {ip_bytes(h.vip): h for h in self.hosts}
        self._vip_bytes: dict[HostState, bytes] = {h: ip_bytes(h.vip) for h in self.hosts}
        self._live: dict[bytes, HostState] = {}  # VIP → link that can take frames
        self._observers: list[Observer] = []
        self._packet_observers: list[Observer] = []
        self._on_switched: list[Callable[[HostState, HostState, bytes], None]] = []
        self._on_dropped: list[Callable[[HostState, str, bytes], None]] = []
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._wake = trio.Event()
        self.done = trio.Event()
        self.exit_code = 0
        self._no_route_last = 0.0
        self._no_route_suppressed = 0

    # -- public -----------------------------------------------------------------------
    def add_observer(self, observer: Observer) -> None:
        """Watch the manager.  Only observers that define ``frame_switched`` or
        ``frame_dropped`` (other than the no-op) put the switch on its per-frame path."""
        self._observers.append(observer)
        if _overrides(observer, "frame_switched"):
            self._on_switched.append(observer.frame_switched)  # bound once, not per frame
        if _overrides(observer, "frame_dropped"):
            self._on_dropped.append(observer.frame_dropped)
        if any(_overrides(observer, m) for m in ("frame_switched", "frame_dropped")):
            self._packet_observers.append(observer)

    @property
    def nursery(self) -> trio.Nursery:
        """The manager's nursery (for extra services such as the relay), once running."""
        if self._nursery is None:
            raise RuntimeError("the manager is not running")
        return self._nursery

    def host(self, name: str) -> HostState:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def learned_routes(self) -> list[tuple[str, str]]:
        """Learned routes as ``(ip, via VIP)``, least recently used first."""
        return self.routing.learned()

    def snapshot(self) -> dict[str, Any]:
        return {"version": __version__, "hosts": [h.to_dict() for h in self.hosts],
                "learned_routes": self.learned_routes(),
                "cidr_routes": self.routing.cidr_routes()}

    def agent_command(self, host: HostSpec) -> tuple[list[str], bytes]:
        """How to start ``host``'s agent: argv, and bytes to write to its stdin first.

        Override for hosts that need a loader sent over stdin before the first frame.
        """
        if host.argv is None:
            argv = [sys.executable, "-m", "norouter_trio", "agent", "--automated"]
            if self.debug:
                argv.append("--debug")
            return argv, b""
        if host.bootstrap:  # [bootstrap] zero-install agent: loader + zipapp over stdin
            from norouter_trio import bootstrap

            return bootstrap.agent_command(self, host)
        return list(host.argv), b""

    async def prepare_agent(self, host: HostSpec) -> None:
        """Slow work that ``agent_command`` needs, done without blocking the loop (the
        bootstrap zipapp is built in a worker thread, once per process)."""
        if host.bootstrap and host.cmd is not None:
            from norouter_trio import bootstrap

            await bootstrap.prepare(host)

    def stop(self, *, force: bool = False) -> None:
        """Begin shutdown: SIGINT and EOF to every agent (SIGKILL with ``force``)."""
        self._stopping = True
        for h in self.hosts:
            if h.state != "exited":
                self._terminate(h, signal.SIGKILL if force else signal.SIGINT)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> int:
        """Run until ``stop()`` or until every agent has exited; return the exit code."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for h in self.hosts:
                    nursery.start_soon(self._run_link, h)
                task_status.started()
                await self._wake.wait()
                if not self._stopping:
                    log.error("every agent has exited; stopping")
                    self.exit_code = 1
                with trio.move_on_after(self.grace + 2.0):
                    for h in self.hosts:
                        await h.done.wait()
                nursery.cancel_scope.cancel()
        finally:
            for h in self.hosts:
                self._kill_now(h)
            self.done.set()
        return self.exit_code

    # -- notifications ----------------------------------------------------------------
    def _notify(self, method: str, *args: Any) -> None:
        for o in self._observers:
            fn = getattr(o, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception:
                log.exception("observer %r failed in %s", o, method)

    def _dropped(self, src: HostState, reason: str, packet: bytes) -> None:
        for fn in self._on_dropped:
            try:
                fn(src, reason, packet)
            except Exception:
                log.exception("observer %r failed in frame_dropped", fn)

    def _warn(self, h: HostState, msg: str) -> None:
        log.warning("%s: %s", h.label, msg)
        self._notify("agent_warning", h, msg)

    # -- process ----------------------------------------------------------------------
    def _spawn(self, h: HostState, argv: list[str]) -> tuple[int, int]:
        """Start the agent; return our ends (stdout, stderr) and set ``h.stdin``."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        parent = os.getpid()
        try:
            h.process = subprocess.Popen(
                argv, stdin=in_r, stdout=out_w, stderr=err_w, close_fds=True,
                preexec_fn=lambda: _child_setup(parent))
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        h.pid = h.process.pid
        _raise_pipe_size(in_w)
        _raise_pipe_size(out_r)
        h.stdin = Pipe(in_w)
        return out_r, err_r

    def _signal(self, h: HostState, sig: int) -> None:
        p = h.process
        if p is None or p.returncode is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)

    def _terminate(self, h: HostState, sig: int = signal.SIGINT) -> None:
        """Ask the agent to go (signal + EOF on stdin); the link kills it after the grace."""
        h.terminating = True
        h.terminate_requested.set()
        self._signal(h, sig)
        if h.stdin is not None:
            with contextlib.suppress(Exception):
                h.stdin.close()

    def _kill_now(self, h: HostState) -> None:
        self._signal(h, signal.SIGKILL)

    async def _wait_exit(self, p: subprocess.Popen[bytes]) -> int:
        pidfd = -1
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(p.pid)
        try:
            while p.poll() is None:
                if pidfd >= 0:
                    await trio.lowlevel.wait_readable(pidfd)
                else:
                    await trio.sleep(0.05)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        assert p.returncode is not None
        return p.returncode

    # -- one link ---------------------------------------------------------------------
    async def _run_link(self, h: HostState) -> None:
        try:
            try:
                await self.prepare_agent(h.spec)
                argv, preamble = self.agent_command(h.spec)
            except (OSError, RuntimeError, ValueError) as e:
                h.exit_reason = f"cannot start its agent: {e}"
                log.error("%s: %s", h.label, h.exit_reason)
                return
            h.argv = argv
            log.debug("%s: starting agent: %s", h.label, " ".join(argv))
            self._notify("agent_starting", h, argv)
            try:
                out_fd, err_fd = self._spawn(h, argv)
            except OSError as e:
                h.exit_reason = f"cannot start {argv[0]!r}: {e.strerror or e}"
                log.error("%s: %s (check the host's cmd in the manifest)", h.label, h.exit_reason)
                return
            send, recv = trio.open_memory_channel[
                tuple[list[bytes | memoryview], int, int]](QUEUE_BATCHES)
            request = Request(id=h.request_id, op="configure", args=self.configure[h.name])
            first = preamble + frames.encode_frame(frames.TYPE_JSON, encode_message(request))
            send.send_nowait(([first], 0, len(first)))
            h.queued_bytes += len(first)
            h.send = send
            self._live[ip_bytes(h.vip)] = h
            stdout = Pipe(out_fd)
            stderr = Pipe(err_fd)
            assert h.process is not None
            async with trio.open_nursery() as n:
                stderr_done = trio.Event()
                reader_done = trio.Event()
                n.start_soon(self._writer, h, recv)
                n.start_soon(self._stderr_relay, h, stderr, stderr_done)
                n.start_soon(self._reader, h, stdout, reader_done)
                n.start_soon(self._killer, h)
                n.start_soon(self._configure_watch, h)
                code = await self._wait_exit(h.process)
                h.exit_code = code
                with trio.move_on_after(1.0):
                    await reader_done.wait()
                    await stderr_done.wait()
                n.cancel_scope.cancel()
            stdout.close()
            stderr.close()
            if h.stdin is not None:
                h.stdin.close()
            lines = list(h.last_stderr)
            how = _describe_exit(code)
            if self._stopping:
                log.info("%s: agent stopped (%s)", h.label, how)
            else:
                reason = f"; {h.exit_reason}" if h.exit_reason else ""
                tail = f"; last stderr: {' | '.join(lines[-3:])}" if lines else ""
                log.error("%s: agent exited (%s%s)%s", h.label, how, reason, tail)
            self._notify("agent_exited", h, code, lines)
        finally:
            self._live.pop(ip_bytes(h.vip), None)
            if h.send is not None:
                h.send.close()
            h.state = "exited"
            h.done.set()
            if all(x.done.is_set() for x in self.hosts):
                self._wake.set()

    async def _configure_watch(self, h: HostState) -> None:
        """Say so when an agent does not answer its configure request (a hung ssh, a cmd
        that is not norouter ...); the link keeps waiting."""
        await trio.sleep(CONFIGURE_WARN_AFTER)
        if h.state == "starting" and not h.terminating:
            self._warn(h, f"no answer to the configure request after "
                       f"{CONFIGURE_WARN_AFTER:.0f} s; is its cmd starting `norouter agent "
                       f"--automated`? (stderr is relayed as stderr[{h.label}])")

    async def _killer(self, h: HostState) -> None:
        """Once the agent is asked to go, SIGKILL it (and its group) after the grace."""
        await h.terminate_requested.wait()
        await trio.sleep(self.grace)
        if h.process is not None and h.process.poll() is None:
            log.warning("%s: agent still running %.1f s after SIGINT; killing it",
                        h.label, self.grace)
            self._kill_now(h)

    async def _writer(self, h: HostState, recv: trio.MemoryReceiveChannel[
            tuple[list[bytes | memoryview], int, int]]) -> None:
        """Drain the queue into the agent's stdin: many queue entries per ``writev``."""
        receive_nowait = recv.receive_nowait
        stdin = h.stdin
        assert stdin is not None
        try:
            async for parts, count, size in recv:
                await stdin.wait_idle()  # a reader may be splicing a frame into the pipe
                while size < WRITE_BATCH_BYTES and len(parts) < IOV_MAX:
                    try:
                        p, c, n = receive_nowait()
                    except trio.WouldBlock:
                        break
                    parts.extend(p)
                    size += n
                    count += c
                if h.tail:  # the rest of a frame whose splice found the pipe full
                    parts.insert(0, h.tail)
                    size += len(h.tail)
                    h.tail = b""
                h.queued_bytes -= size
                if h.congested and h.queued_bytes <= self.queue_bytes // 2:
                    h.congested = False
                    log.info("%s: queue drained; forwarding again", h.label)
                h.room.set()
                h.room = trio.Event()
                stdin.acquire_nowait()
                try:
                    # No checkpoint after the write: the next receive is one.
                    await stdin.write(parts, checkpoint=False)
                    h.frames_out += count
                    h.bytes_out += size
                finally:
                    stdin.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            if not h.terminating:
                log.debug("%s: stdin closed (%s)", h.label, e)
        finally:
            # Frames for this agent are dropped from now on (counted as host_down).
            self._live.pop(ip_bytes(h.vip), None)
            recv.close()
            h.room.set()

    async def _stderr_relay(self, h: HostState, stream: Pipe,
                            done: trio.Event) -> None:
        pending = b""
        try:
            while True:
                try:
                    data = await stream.read(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
                if not data:
                    if pending:
                        self._stderr_line(h, pending)
                    return
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._stderr_line(h, line)
                if len(pending) > 65536:
                    self._stderr_line(h, pending)
                    pending = b""
        finally:
            done.set()

    def _stderr_line(self, h: HostState, raw: bytes) -> None:
        if h.spec.bootstrap and not h.frames_in:
            # Before its first frame a bootstrapped agent is Python's interactive
            # interpreter (``-i``), which writes its prompt before reading the loader line.
            while raw.startswith(_PROMPTS):
                raw = raw[4:]
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        h.last_stderr.append(line)
        log.info("stderr[%s]: %s", h.label, line)
        self._notify("agent_stderr", h, line)

    async def _reader(self, h: HostState, stream: Pipe,
                      done: trio.Event) -> None:
        """Parse big reads of frames and switch them; splice runs of large frames.

        Once a large frame has been spliced the reader stays in splice mode: it looks at
        the next frames through ``tee`` (``_splice_run``) and moves whole runs of large
        frames for one destination with one ``splice``, so they never pass through user
        space.  Anything else (small frames, a busy destination) goes back to big reads."""
        decoder = frames.FrameDecoder(h.label)
        size = READ_SIZE
        splicing = False
        try:
            while True:
                if splicing and self._packet_observers:
                    splicing = False  # observers see every packet: no splicing
                if splicing and not decoder.buffered:
                    try:
                        first = await self._splice_run(h, stream)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                        h.exit_reason = h.exit_reason or f"stdout unreadable: {e}"
                        break
                    if first is None:
                        continue
                    # A large frame to read ourselves (and then look again), or leave.
                    splicing = first > 0
                    size = first or READ_SIZE
                try:
                    data = await stream.read(size)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    h.exit_reason = h.exit_reason or f"stdout unreadable: {e}"
                    break
                try:
                    if not data:
                        decoder.eof()
                        break
                    groups = decoder.feed_raw(data)
                except frames.FrameError as e:
                    h.exit_reason = f"sent garbage: {e}"
                    log.error("%s: %s; stopping this agent", h.label, e)
                    h.drop("bad_stream")
                    break
                for buf, spans in groups:
                    blocked = self._switch(h, buf, spans)
                    if blocked:
                        await self._wait_for_room(h, blocked)
                size = READ_SIZE
                pending = decoder.pending_frame()
                if (pending is None or pending[1] < SPLICE_MIN or _tee is None
                        or self._packet_observers):
                    continue
                head, total = pending
                if len(head) < PEEK_SIZE:  # read the rest of the routing prefix first
                    size = PEEK_SIZE - len(head)
                    continue
                dst = await self._splice_target(head, stream.fd, total - len(head))
                if dst is not None:
                    decoder.take_pending()
                    await self._splice(h, dst, stream, head, total - len(head), 1)
                    splicing = True
                elif splicing:  # read just this frame, then look at the pipe again
                    size = total - len(head)
        finally:
            if not h.terminating:
                self._terminate(h)
            if h.tee is not None:
                h.tee.close()
                h.tee = None
            done.set()

    # -- the switch: large frames --------------------------------------------------------
    def _route_prefix(self, head: bytes | memoryview) -> HostState | None:
        """The live destination of a frame from its first ``PEEK_SIZE`` bytes, if it is a
        large IPv4 frame (else None: the normal path decides, drops and counts)."""
        if head[4:6] != b"\x00\x01" or head[8] >> 4 != 4:
            return None
        dst_ip = bytes(head[24:28])
        dst = self._live.get(dst_ip)
        if dst is None:
            owner = self.routing.resolve(dst_ip)
            dst = self._live.get(owner) if owner is not None else None
        return dst

    async def _splice_target(self, head: bytes, src_fd: int, rest: int) -> HostState | None:
        """Where the large frame starting with ``head`` can be spliced to, or None.

        Its remaining ``rest`` bytes must be in the source pipe already (a slow source must
        not hold the destination), and the destination must be idle: frames queued before
        this one go first, and waiting briefly for them is worth it, since from then on a
        stream of large frames is spliced."""
        dst = self._route_prefix(head)
        if dst is None or dst.congested or dst.stdin is None:
            return None
        try:
            avail = struct.unpack("i", fcntl.ioctl(src_fd, termios.FIONREAD, _INT0))[0]
        except OSError:
            return None
        if avail < rest:
            return None
        return dst if await self._wait_idle(dst) else None

    async def _wait_idle(self, dst: HostState) -> bool:
        """Whether ``dst``'s stdin is free with nothing queued (after a short wait)."""
        stdin = dst.stdin
        if stdin is None:
            return False
        if dst.queued_bytes or dst.tail or stdin.busy:
            if dst.queued_bytes > SPLICE_WAIT_BYTES:
                return False
            with trio.move_on_after(SPLICE_WAIT):
                while dst.queued_bytes or dst.tail or stdin.busy:
                    await stdin.wait_released()
            if dst.queued_bytes or dst.tail or stdin.busy:
                return False
        return not stdin.closed and self._live.get(self._vip_bytes[dst]) is dst

    async def _splice_run(self, src: HostState, stream: Pipe) -> int | None:
        """Splice the run of whole large frames for one destination at the head of the
        source pipe (None), else consume nothing and return the length of the next frame
        if it is a large one that the reader should read itself (not whole in the pipe
        yet, or its destination is busy), or 0 (leave splice mode).

        ``tee`` duplicates the pipe's contents into a private pipe without consuming them;
        the frame headers are read from that copy (the bodies skipped to /dev/null), then
        the run is moved to the destination with ``splice``."""
        fd = stream.fd
        tee = src.tee
        if tee is None:
            tee = src.tee = _TeePipe()
        while True:
            if stream.closed:
                raise trio.ClosedResourceError("pipe closed")
            n = tee.tee_from(fd)
            if n is not None:
                break
            await trio.lowlevel.wait_readable(fd)
        if n < PEEK_SIZE:
            tee.discard(n)
            return 0
        dst: HostState | None = None
        run = count = first = 0
        consumed = 0  # bytes taken from the tee copy
        # The per-frame loop: two cheap syscalls on the private pipe, no copy of bodies.
        read, splice, unpack, live = os.read, os.splice, _WORD.unpack_from, self._live
        tee_r, null = tee.r, tee.null
        while n - run >= PEEK_SIZE:
            head = read(tee_r, PEEK_SIZE)
            consumed += len(head)
            if len(head) < PEEK_SIZE:
                break
            word, ftype = unpack(head)
            total = 4 + (word & 0xFFFFFF)
            if word >> 24 != frames.MAGIC or total < SPLICE_MIN:
                break
            d = live.get(head[24:28]) if ftype == 1 and head[8] >> 4 == 4 else None
            if d is None:
                d = self._route_prefix(head)
                if d is None:
                    break
            if not count:
                first = total
            if run + total > n or (dst is not None and d is not dst):
                break
            dst = d
            run += total
            count += 1
            if run + PEEK_SIZE > n:
                break
            skip = total - PEEK_SIZE
            while skip > 0:
                moved = splice(tee_r, null, skip, flags=_SPLICE_FLAGS)
                if moved <= 0:
                    raise OSError("the tee pipe ended early")
                skip -= moved
                consumed += moved
        tee.discard(n - consumed)
        if dst is None or dst.congested or not await self._wait_idle(dst):
            return first
        await self._splice(src, dst, stream, b"", run, count)
        await trio.lowlevel.checkpoint()
        return None

    async def _splice(self, src: HostState, dst: HostState, stream: Pipe,
                      head: bytes, rest: int, count: int) -> None:
        """Write ``head`` to ``dst``, then move ``rest`` bytes (the remainder of ``count``
        whole frames) from the source's pipe to the destination's with ``splice``.

        The frames are all in the source pipe, so only the destination can make us wait; as
        with full queues we wait up to ``BACKPRESSURE_WAIT`` for room, then read what is
        left into ``dst.tail`` (its writer sends it first), mark ``dst`` congested and go
        on.  If the destination goes away, the rest is skipped."""
        stdin = dst.stdin
        assert stdin is not None
        out, src_fd = stdin.fd, stream.fd
        view = memoryview(head)
        total = len(head) + rest
        src.frames_in += count
        src.bytes_in += total
        stdin.acquire_nowait()
        try:
            while view or rest:
                if stdin.closed:
                    break
                try:
                    if view:
                        view = view[os.write(out, view):]
                    else:
                        n = os.splice(src_fd, out, rest, flags=_SPLICE_FLAGS)
                        if n == 0:  # cannot happen: the frames were seen in the pipe
                            raise OSError("the pipe ended inside a frame")
                        rest -= n
                except BlockingIOError:
                    with trio.move_on_after(BACKPRESSURE_WAIT):
                        await trio.lowlevel.wait_writable(out)
                        continue
                    if stdin.closed:
                        break
                    dst.tail = bytes(view) + _read_exactly(src_fd, rest)
                    dst.queued_bytes += len(dst.tail)
                    self._mark_congested(dst)
                    if dst.send is not None:  # wake the writer
                        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                                 trio.ClosedResourceError):
                            dst.send.send_nowait(([], 0, 0))
                    dst.frames_out += count
                    dst.bytes_out += total - len(dst.tail)
                    return
                except (BrokenPipeError, ConnectionResetError):
                    break
            else:
                dst.frames_out += count
                dst.bytes_out += total
                return
        except trio.ClosedResourceError:
            pass
        finally:
            stdin.release()
        # The destination went away mid-frame: its stream is over; skip the rest.
        _read_exactly(src_fd, rest)
        dst.drop("host_down", count)

    # -- the switch -------------------------------------------------------------------
    def _switch(self, src: HostState, buf: bytes, spans: list[tuple[int, int, int]]
                ) -> list[_Blocked]:
        """Route every frame of one read chunk; queue runs of frames per destination.

        Returns what could not be queued because the destination's queue is full (and
        the destination is not marked congested): the reader waits a little for room.
        """
        if self._packet_observers:
            return self._switch_observed(src, buf, spans)
        live = self._live
        view = memoryview(buf)
        pending: dict[HostState, list[bytes | memoryview]] = {}
        counts: dict[HostState, int] = {}
        run_dst: HostState | None = None
        run_start = run_end = run_n = 0
        for ftype, start, end in spans:
            if ftype == 1 and end - start >= 28 and buf[start + 8] >> 4 == 4:
                dst = live.get(buf[start + 24:start + 28])
                if dst is None:
                    dst = self._slow_route(src, buf[start + 8:end])
                    if dst is None:
                        continue
                if dst is run_dst and start == run_end:
                    run_end = end
                    run_n += 1
                    continue
                if run_dst is not None:
                    pending.setdefault(run_dst, []).append(view[run_start:run_end])
                    counts[run_dst] = counts.get(run_dst, 0) + run_n
                run_dst, run_start, run_end, run_n = dst, start, end, 1
            else:
                self._other_frame(src, ftype, buf[start + 8:end])
        if run_dst is not None:
            pending.setdefault(run_dst, []).append(
                buf if run_end - run_start == len(buf) else view[run_start:run_end])
            counts[run_dst] = counts.get(run_dst, 0) + run_n
        src.frames_in += len(spans)
        src.bytes_in += spans[-1][2] - spans[0][1]  # the spans of a group are contiguous
        blocked: list[_Blocked] = []
        for dst, parts in pending.items():
            if not self._enqueue(src, dst, parts, counts[dst]):
                blocked.append((dst, parts, counts[dst]))
        return blocked

    def _switch_observed(self, src: HostState, buf: bytes,
                         spans: list[tuple[int, int, int]]) -> list[_Blocked]:
        """The same decisions, frame by frame, telling the observers."""
        live = self._live
        on_switched = self._on_switched
        view = memoryview(buf)
        pending: dict[HostState, list[bytes | memoryview]] = {}
        for ftype, start, end in spans:
            src.frames_in += 1
            src.bytes_in += end - start
            if ftype == 1 and end - start >= 28 and buf[start + 8] >> 4 == 4:
                dst = live.get(buf[start + 24:start + 28])
                if dst is None:
                    dst = self._slow_route(src, buf[start + 8:end])
                    if dst is None:
                        continue
                packet = buf[start + 8:end]
                for fn in on_switched:
                    try:
                        fn(src, dst, packet)
                    except Exception:
                        log.exception("observer %r failed in frame_switched", fn)
                pending.setdefault(dst, []).append(view[start:end])
            else:
                self._other_frame(src, ftype, buf[start + 8:end])
        blocked: list[_Blocked] = []
        for dst, parts in pending.items():
            if not self._enqueue(src, dst, parts, len(parts)):
                blocked.append((dst, parts, len(parts)))
        return blocked

    def _slow_route(self, src: HostState, packet: bytes) -> HostState | None:
        """Learned / CIDR routes, or a counted drop with a rate-limited warning."""
        owner = self.routing.resolve(packet[16:20])
        if owner is not None:
            dst = self._live.get(owner)
            if dst is not None:
                return dst
            reason = "host_down"
            src.drop(reason)
            self._no_route_warning(src, packet, f"its owner {ip_str(owner)} is not running")
        else:
            reason = "no_route"
            src.drop(reason)
            self._no_route_warning(src, packet, "no host has that VIP and no route covers it")
        if self._on_dropped:
            self._dropped(src, reason, packet)
        return None

    def _no_route_warning(self, src: HostState, packet: bytes, why: str) -> None:
        now = time.monotonic()
        if now - self._no_route_last < NO_ROUTE_WARN_INTERVAL:
            self._no_route_suppressed += 1
            return
        more = (f" ({self._no_route_suppressed} similar drops not logged)"
                if self._no_route_suppressed else "")
        self._no_route_last = now
        self._no_route_suppressed = 0
        log.warning("dropping a packet from %s to %s: %s%s", src.label,
                    ip_str(packet[16:20]), why, more)

    def _enqueue(self, src: HostState, dst: HostState, parts: list[bytes | memoryview],
                 n: int, *, final: bool = False) -> bool:
        """Queue frames for ``dst``.  False: the queue is full and the caller may wait for
        room; frames for a congested destination (or with ``final``) are dropped."""
        size = sum(map(len, parts))
        send = dst.send
        assert send is not None
        stdin = dst.stdin
        if (not dst.queued_bytes and not dst.tail and stdin is not None and not stdin.busy
                and not stdin.closed):
            # The fast path: nothing queued and nobody writing, so the frames go straight
            # into the pipe; the writer task only takes over what the pipe does not take.
            try:
                rest = stdin.write_nowait(parts)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the queue path below counts the loss once the writer has gone
            else:
                dst.frames_out += n
                if not rest:
                    dst.bytes_out += size
                    return True
                left = sum(map(len, rest))
                dst.bytes_out += size - left
                # The rest starts mid-frame: it must go next, before anything queued
                # later, so it becomes the queue's head (the queue is empty).
                try:
                    send.send_nowait((rest, 0, left))
                except trio.WouldBlock:  # only wake-up entries in the queue: use the tail
                    dst.tail = b"".join(rest)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    dst.drop("host_down", n)
                    return True
                dst.queued_bytes += left
                return True
        if dst.queued_bytes == 0 or dst.queued_bytes + size <= self.queue_bytes:
            try:
                send.send_nowait((parts, n, size))
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                dst.drop("host_down", n)
                return True
            else:
                dst.queued_bytes += size
                return True
        if dst.congested or final:
            self._mark_congested(dst)
            dst.drop("queue_full", n)
            if self._on_dropped:  # on that path each part is one whole frame
                for part in parts:
                    self._dropped(src, "queue_full", bytes(part[8:]))
            return True
        return False

    def _mark_congested(self, dst: HostState) -> None:
        if not dst.congested:
            dst.congested = True
            log.warning("%s: its queue stays full (%d bytes); dropping frames for it "
                        "until it drains", dst.label, dst.queued_bytes)

    async def _wait_for_room(self, src: HostState, blocked: list[_Blocked]) -> None:
        """Back-pressure for a destination that is merely slower: hold this source's reader
        up to ``BACKPRESSURE_WAIT`` for room, then drop and mark the destination congested
        (frames for it are then dropped at once, so a stuck agent stalls nobody)."""
        for dst, parts, n in blocked:
            with trio.move_on_after(BACKPRESSURE_WAIT):
                while not self._enqueue(src, dst, parts, n):
                    await dst.room.wait()
                continue
            self._enqueue(src, dst, parts, n, final=True)

    def _other_frame(self, src: HostState, ftype: int, payload: bytes) -> None:
        if ftype == frames.TYPE_L3:
            src.drop("bad_packet")
            if self._on_dropped:
                self._dropped(src, "bad_packet", payload)
            log.debug("%s: dropped an L3 frame that is not an IPv4 packet (%d bytes)",
                      src.label, len(payload))
        elif ftype == frames.TYPE_JSON:
            self._handle_json(src, payload)
        else:
            src.drop("unknown_type")
            # The first one per host is a warning; the rest only count (no log flood).
            level = logging.DEBUG if src.drops["unknown_type"] > 1 else logging.WARNING
            log.log(level, "%s: skipping a frame of unknown type %d (%d bytes)",
                    src.label, ftype, len(payload))

    # -- control messages -------------------------------------------------------------
    def _handle_json(self, h: HostState, payload: bytes) -> None:
        try:
            msg = decode_message(payload)
        except MessageError as e:
            self._warn(h, f"ignoring a bad JSON message: {e}")
            return
        if isinstance(msg, Result):
            self._handle_result(h, msg)
        elif isinstance(msg, Request):
            self._warn(h, f"ignoring a {msg.op!r} request sent by an agent")
        else:
            self._handle_event(h, msg)

    def _handle_result(self, h: HostState, res: Result) -> None:
        if res.request_id != h.request_id or h.state != "starting":
            self._warn(h, f"ignoring an unexpected result for request {res.request_id}")
            return
        if res.error is not None or res.data is None:
            self._refuse(h, f"configure failed: {res.error_message or 'no data in the result'}")
            return
        feats = list(res.data.features)
        h.features = feats
        h.version = res.data.version
        if "tcp" not in feats:
            self._refuse(h, "the agent does not support the 'tcp' feature (upgrade it)")
            return
        args = self.configure[h.name]
        if args.loopback_disable and "loopback.disable" not in feats:
            self._refuse(h, "the manifest sets loopback.disable but the agent lacks the "
                         "'loopback.disable' feature; it would listen on loopback addresses "
                         "(upgrade the agent or remove loopback.disable)")
            return
        used = {"http": bool(args.http_listen), "socks": bool(args.socks_listen),
                "etchosts": args.write_etc_hosts, "routes": bool(args.routes), "dns": True}
        for feat in OPTIONAL_FEATURES:
            if used[feat] and feat not in feats:
                self._warn(h, f"the agent lacks the {feat!r} feature; that part of its "
                           "configuration is ignored")
        if h.version != __version__:
            self._warn(h, f"agent version {h.version} differs from the manager's "
                       f"{__version__}")
        h.state = "ready"
        log.info("Ready: %s", h.vip)
        self._notify("agent_configured", h, feats, h.version)

    def _refuse(self, h: HostState, why: str) -> None:
        h.exit_reason = why
        log.error("%s: %s; stopping this agent", h.label, why)
        self._notify("agent_warning", h, why)
        self._live.pop(ip_bytes(h.vip), None)
        self._terminate(h)

    def _handle_event(self, h: HostState, msg: Event) -> None:
        if not isinstance(msg.data, RouteSuggestion):
            self._warn(h, f"ignoring an event of type {msg.type!r}")
            return
        ips, via = msg.data.ip, msg.data.route
        try:
            via_b = ip_bytes(via)
        except ValueError:
            self._warn(h, f"ignoring a routeSuggestion via {via!r} (not an IPv4 address)")
            return
        if via_b not in self._by_vip_all:
            self._warn(h, f"ignoring a routeSuggestion via {via} (no host has that VIP)")
            return
        accepted = self.routing.learn([str(ip) for ip in ips], via)
        if accepted:
            log.info("route learned from %s: %s via %s", h.label, ", ".join(accepted), via)
            self._notify("route_learned", accepted, via)

