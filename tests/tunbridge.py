"""Bridge L3 packets between our user-space stack and the Linux kernel through a TUN device.

The kernel of a private network namespace is the reference TCP peer for our stack: the
bridge owns a TUN device (IFF_TUN | IFF_NO_PI) inside that namespace and hands the test two
bounded trio channels of whole IPv4 packets, `to_kernel` (give it to
`NetStack(vip, outbound=...)`) and `from_kernel` (give it to `NetStack.run(...)`).

Addressing, and why:
- The kernel owns `kernel_ip` (default 198.18.0.1/32, a benchmarking range kept inside the
  namespace) on the TUN; kernel-side servers listen there, and it is the source address the
  kernel uses towards our VIP (the route's `src` hint).
- `vip_net` (default 127.0.42.0/24, our VIPs) is routed to the TUN by a route in the *local*
  table: every namespace has `local 127.0.0.0/8 dev lo` there, which would otherwise make
  the kernel treat 127.0.42.x as its own; a longer prefix in the same table wins.
- `net.ipv4.conf.all.route_localnet=1` (set by `netns.create`) lets the kernel accept
  127/8 sources on, and route 127/8 destinations to, a non-loopback device.
- IPv6 is disabled in the namespace so the TUN carries no router solicitations or MLD.
- Kernel sockets (tun_peer.py) use cubic, Linux's default, not the host's choice: a BBR
  sender paces to the bandwidth it measured, which mirrors our own speed back at us.

MTU and offloads: the TUN MTU defaults to 65535 (the largest a TUN takes; our link MTU is
65536), so the kernel's MSS is 65495. Without IFF_VNET_HDR and TUNSETOFFLOAD the TUN has no
checksum offload and no TSO/GSO, so every packet read is at most one MTU and carries full
checksums; nothing needs turning off. Pass `mtu=1500` for many small segments.

Channel "full" behaviour: when `from_kernel` is full the bridge stops reading the TUN, the
TUN queue (txqueuelen 500) fills and the kernel drops, like a congested link; when
`to_kernel` is full the stack's sender waits (back-pressure, as on the agent's stdout).

Fault injection (`Faults`) is seeded and reproducible: the same seed and the same packet
sequence give the same drops, duplicates and reorderings. A packet chosen for reordering is
held and released after the next `reorder_after` packets pass, or after `hold_max` seconds
if traffic stops first. Faults apply to every IPv4 packet, SYNs and FINs included.

Set NOROUTER_TUN_PCAP=DIR to also capture each TUN with tcpdump (headers only) into DIR.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import logging
import math
import os
import random
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import netns
import trio
from tun_packets import TCPInfo, describe, parse_tcp, problem

log = logging.getLogger("tunbridge")

TO_KERNEL = "to-kernel"
FROM_KERNEL = "from-kernel"
PEER_SCRIPT = Path(__file__).with_name("tun_peer.py")

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_READ_SIZE = 65536 + 64  # one packet per read; larger than any TUN MTU
_TRACE_HEADER = 80  # bytes of each packet a trace keeps: IPv4 + TCP headers with options
_ifnames = itertools.count()


@dataclass(frozen=True)
class Faults:
    """What the bridge does to packets in one direction; probabilities are per packet."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_after: int = 3
    hold_max: float = 0.05
    delay: float = 0.0
    seed: int = 0


class FaultInjector:
    """Sans-IO: packets in, packets out (now or at `next_deadline()`), decisions seeded.

    Three random numbers are drawn per packet whatever happens, so one fault never shifts
    the decisions about later packets.
    """

    def __init__(self, faults: Faults, stream: str,
                 on_event: Callable[[str, bytes], None] | None = None) -> None:
        self.faults = faults
        self._rng = random.Random(f"{faults.seed}/{stream}")
        self._held: list[tuple[list[bytes], int, float]] = []  # (copies, remaining, deadline)
        self._delayed: deque[tuple[float, bytes]] = deque()
        self._on_event = on_event
        self.counters = {"dropped": 0, "duplicated": 0, "reordered": 0}

    def _event(self, kind: str, packet: bytes) -> None:
        if self._on_event is not None:
            self._on_event(kind, packet)

    def feed(self, packet: bytes, now: float) -> list[bytes]:
        f = self.faults
        r_drop, r_dup, r_hold = self._rng.random(), self._rng.random(), self._rng.random()
        ready: list[bytes] = []
        if r_drop < f.drop:
            self.counters["dropped"] += 1
            self._event("drop", packet)
            return self._delay(ready, now)
        copies = [packet]
        if r_dup < f.duplicate:
            self.counters["duplicated"] += 1
            self._event("dup", packet)
            copies.append(packet)
        if r_hold < f.reorder:
            self.counters["reordered"] += 1
            self._event("hold", packet)
            self._held.append((copies, f.reorder_after, now + f.hold_max))
            return self._delay(ready, now)
        ready.extend(copies)
        still: list[tuple[list[bytes], int, float]] = []
        for held, remaining, deadline in self._held:
            if remaining <= 1:
                self._event("release", held[0])
                ready.extend(held)
            else:
                still.append((held, remaining - 1, deadline))
        self._held = still
        return self._delay(ready, now)

    def poll(self, now: float) -> list[bytes]:
        ready: list[bytes] = []
        still = []
        for entry in self._held:
            if entry[2] <= now:
                self._event("release", entry[0][0])
                ready.extend(entry[0])
            else:
                still.append(entry)
        self._held = still
        out = self._delay(ready, now)
        while self._delayed and self._delayed[0][0] <= now:
            out.append(self._delayed.popleft()[1])
        return out

    def next_deadline(self) -> float | None:
        times = [deadline for _, _, deadline in self._held]
        if self._delayed:
            times.append(self._delayed[0][0])
        return min(times) if times else None

    def _delay(self, ready: list[bytes], now: float) -> list[bytes]:
        if self.faults.delay <= 0:
            return ready
        self._delayed.extend((now + self.faults.delay, p) for p in ready)
        return []


class PacketWatch:
    """Fires on the first packet on the wire in one direction that matches a predicate."""

    def __init__(self, direction: str, predicate: Callable[[TCPInfo], bool],
                 what: str) -> None:
        self.direction = direction
        self.predicate = predicate
        self.what = what
        self.packet: TCPInfo | None = None
        self.event = trio.Event()

    async def wait(self, timeout: float) -> TCPInfo:
        """The matching packet; AssertionError naming what was awaited on timeout."""
        with trio.move_on_after(timeout):
            await self.event.wait()
        if self.packet is None:
            raise AssertionError(f"no {self.direction} packet {self.what} within {timeout} s")
        return self.packet


@dataclass
class TunBridge:
    """A running bridge; see the module docstring for addressing and channel behaviour."""

    ns: netns.Netns
    ifname: str
    vip: str
    kernel_ip: str
    mtu: int
    to_kernel: trio.MemorySendChannel[bytes]
    from_kernel: trio.MemoryReceiveChannel[bytes]
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    injectors: dict[str, FaultInjector] = field(default_factory=dict)
    check_packets: bool = True
    trace_len: int = 400
    problems: list[str] = field(default_factory=list)  # malformed packets from our stack
    _trace: deque[tuple[float, str, str, int, bytes]] = field(default_factory=deque)
    _watches: list[PacketWatch] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._trace = deque(maxlen=self.trace_len)
        for d in (TO_KERNEL, FROM_KERNEL):
            self.counters[d] = {"packets": 0, "bytes": 0, "non_ipv4": 0, "write_errors": 0,
                                "malformed": 0, "oversize": 0}

    def watch(self, direction: str, predicate: Callable[[TCPInfo], bool],
              what: str = "matching") -> PacketWatch:
        """Register before acting, then `await w.wait(timeout)`: no race, no sleep."""
        w = PacketWatch(direction, predicate, what)
        self._watches.append(w)
        return w

    def fault_counters(self) -> dict[str, dict[str, int]]:
        return {d: dict(inj.counters) for d, inj in self.injectors.items()}

    def record(self, direction: str, action: str, packet: bytes) -> None:
        self._trace.append((time.monotonic(), direction, action, len(packet),
                            bytes(packet[:_TRACE_HEADER])))

    def format_trace(self, last: int | None = None) -> str:
        """The last packets seen, one line each, oldest first, in seconds since the bridge
        opened (for failure reports)."""
        entries = list(self._trace)[-last:] if last else list(self._trace)
        if not entries:
            return "(no packets)"
        return "\n".join(f"{t - self._t0:9.4f} {d:11} {a:7} {describe(h)}"
                         for t, d, a, _n, h in entries)

    def check(self, packet: bytes) -> None:
        """Validate a packet from our stack (headers, lengths, checksums) before faults.

        The kernel drops a bad packet silently, which would only show up later as a stall;
        this names the packet instead. Tests assert `problems` is empty at the end.
        """
        what = problem(packet)
        if what is not None:
            self.counters[TO_KERNEL]["malformed"] += 1
            self.record(TO_KERNEL, "BAD", packet)
            if len(self.problems) < 20:
                self.problems.append(f"{what}: {describe(packet)}")
            log.warning("%s: our stack sent a malformed packet (%s): %s", self.ifname, what,
                        describe(packet))

    def on_wire(self, direction: str, packet: bytes) -> None:
        c = self.counters[direction]
        c["packets"] += 1
        c["bytes"] += len(packet)
        self.record(direction, "wire", packet)
        if self._watches:
            info = parse_tcp(packet)
            if info is None:
                return
            for w in [w for w in self._watches if w.direction == direction]:
                if w.predicate(info):
                    w.packet = info
                    w.event.set()
                    self._watches.remove(w)

    def kernel_argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` on the kernel side (inside the namespace)."""
        return self.ns.argv(argv)

    def open_peer(self, *args: str) -> contextlib.AbstractAsyncContextManager[KernelPeer]:
        """Run tests/tun_peer.py with `args` on the kernel side."""
        return open_kernel_peer(self.ns, *args)


def open_tun_in(ns: netns.Netns, ifname: str) -> int:
    """Create TUN `ifname` inside `ns` and return its non-blocking fd.

    Python 3.11 has no os.setns, so a dedicated thread calls libc setns() (which moves only
    that thread), opens /dev/net/tun and does TUNSETIFF there; the device stays in the
    namespace and the fd stays valid after the thread ends. A fresh thread, not a worker
    from a pool, so no other code ever runs in the switched namespace.
    """
    result: dict[str, int | BaseException] = {}

    def worker() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            nsfd = os.open(f"/var/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(nsfd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into namespace {ns.name}: {os.strerror(err)}")
            finally:
                os.close(nsfd)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                ifr = struct.pack("16sH", ifname.encode(), _IFF_TUN | _IFF_NO_PI)
                fcntl.ioctl(fd, _TUNSETIFF, ifr)
            except BaseException:
                os.close(fd)
                raise
            result["fd"] = fd
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=worker, name=f"tun-open-{ns.name}")
    thread.start()
    thread.join()
    error = result.get("error")
    if isinstance(error, BaseException):
        raise OSError(f"cannot create TUN {ifname} in namespace {ns.name}: {error} "
                      "(needs root and /dev/net/tun)") from error
    fd = result["fd"]
    assert isinstance(fd, int)
    return fd


def configure_kernel(ns: netns.Netns) -> None:
    """Reference-peer sysctls: no IPv6, so the TUN carries no router solicitations or MLD.

    The congestion control is not set here: a namespace may only pick one from the host's
    `tcp_allowed_congestion_control` list, so tun_peer.py sets cubic per socket instead.
    """
    ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1"])


def _configure(ns: netns.Netns, ifname: str, vip_net: str, kernel_ip: str, mtu: int) -> int:
    configure_kernel(ns)
    fd = open_tun_in(ns, ifname)
    try:
        ns.run(["ip", "link", "set", ifname, "mtu", str(mtu), "up"])
        ns.run(["ip", "addr", "add", f"{kernel_ip}/32", "dev", ifname])
        ns.run(["ip", "route", "add", vip_net, "dev", ifname, "src", kernel_ip,
                "table", "local"])
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _read_packet(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, _READ_SIZE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


async def _pump(bridge: TunBridge, direction: str, source: Callable[[], Awaitable[bytes]],
                sink: Callable[[bytes], Awaitable[None]]) -> None:
    """Move packets from source to sink through the direction's fault injector, if any."""
    injector = bridge.injectors.get(direction)
    check = bridge.check if direction == TO_KERNEL and bridge.check_packets else None
    on_wire = bridge.on_wire
    try:
        if injector is None:  # the fast path: no cancel scope per packet
            while True:
                packet = await source()
                if check is not None:
                    check(packet)
                on_wire(direction, packet)
                await sink(packet)
        while True:
            received: bytes | None = None
            deadline = injector.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                received = await source()
            now = trio.current_time()
            if received is None:
                out = injector.poll(now)
            else:
                if check is not None:
                    check(received)
                out = injector.feed(received, now) + injector.poll(now)
            for p in out:
                on_wire(direction, p)
                await sink(p)
    except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
        log.debug("%s: a channel closed, the pump stops", direction)


@contextlib.asynccontextmanager
async def open_tun_bridge(*, vip: str = "127.0.42.1", vip_net: str = "127.0.42.0/24",
                          kernel_ip: str = "198.18.0.1", mtu: int = 65535,
                          to_kernel_faults: Faults | None = None,
                          from_kernel_faults: Faults | None = None,
                          buffer: int = 256, check_packets: bool = True,
                          ) -> AsyncIterator[TunBridge]:
    """A namespace with a TUN to our stack; everything is removed on exit, whatever happened.

    `check_packets` validates every packet our stack sends (about 0.6 ms per 64 KiB; the
    benchmark turns it off).
    """
    netns.require_netns()
    with netns.namespaces("nrtun") as (ns,):
        ifname = f"nrtun{next(_ifnames)}"
        fd = await trio.to_thread.run_sync(_configure, ns, ifname, vip_net, kernel_ip, mtu)
        pcap: subprocess.Popen[bytes] | None = None
        try:
            to_send, to_recv = trio.open_memory_channel[bytes](buffer)
            from_send, from_recv = trio.open_memory_channel[bytes](buffer)
            bridge = TunBridge(ns, ifname, vip, kernel_ip, mtu, to_send, from_recv,
                               check_packets=check_packets)
            for direction, faults in ((TO_KERNEL, to_kernel_faults),
                                      (FROM_KERNEL, from_kernel_faults)):
                if faults is not None:
                    def on_event(kind: str, packet: bytes, d: str = direction) -> None:
                        bridge.record(d, kind, packet)
                    bridge.injectors[direction] = FaultInjector(faults, direction, on_event)
            pcap = _start_pcap(ns, ifname)

            async def read_kernel() -> bytes:
                while True:
                    packet = await _read_packet(fd)
                    if len(packet) > mtu:  # would mean GSO/TSO is on after all
                        bridge.counters[FROM_KERNEL]["oversize"] += 1
                        log.warning("%s: kernel sent %d bytes over a %d MTU", ifname,
                                    len(packet), mtu)
                    if packet and packet[0] >> 4 == 4:
                        return packet
                    bridge.counters[FROM_KERNEL]["non_ipv4"] += 1
                    log.info("%s: dropped a non-IPv4 packet of %d bytes from the kernel",
                             ifname, len(packet))

            async def write_kernel(packet: bytes) -> None:
                while True:
                    try:
                        os.write(fd, packet)
                        return
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(fd)
                    except OSError as exc:
                        bridge.counters[TO_KERNEL]["write_errors"] += 1
                        bridge.record(TO_KERNEL, "refused", packet)
                        log.warning("%s: kernel refused a packet (%s): %s", ifname, exc,
                                    describe(packet))
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, bridge, FROM_KERNEL, read_kernel, from_send.send)
                nursery.start_soon(_pump, bridge, TO_KERNEL, to_recv.receive, write_kernel)
                try:
                    yield bridge
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if pcap is not None:
                pcap.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pcap.wait(timeout=5)
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


def _start_pcap(ns: netns.Netns, ifname: str) -> subprocess.Popen[bytes] | None:
    where = os.environ.get("NOROUTER_TUN_PCAP")
    if not where:
        return None
    path = Path(where) / f"{ns.name}-{ifname}.pcap"
    log.info("capturing %s in %s to %s", ifname, ns.name, path)
    proc = ns.popen(["tcpdump", "-U", "-s", "128", "-i", ifname, "-w", str(path)],
                    stderr=subprocess.PIPE)
    assert proc.stderr is not None
    # tcpdump says "listening on ..." once it captures; without waiting the first packets
    # would be missed.
    ready, _, _ = select.select([proc.stderr], [], [], 5)
    if ready:
        proc.stderr.readline()
    else:
        log.warning("tcpdump on %s did not start within 5 s; the capture may miss packets",
                    ifname)
    return proc


class KernelPeer:
    """A tests/tun_peer.py process on the kernel side, followed one stdout line at a time."""

    def __init__(self, process: trio.Process, argv: Sequence[str]) -> None:
        self.process = process
        self.argv = list(argv)
        self.lines: list[str] = []
        self._buffer = b""

    async def line(self, timeout: float = 30) -> str:
        """The next line the peer printed; AssertionError on timeout or exit."""
        assert self.process.stdout is not None
        with trio.move_on_after(timeout):
            while b"\n" not in self._buffer:
                data = await self.process.stdout.receive_some(65536)
                if not data:
                    raise AssertionError(f"kernel peer exited; output so far: {self.lines}")
                self._buffer += data
            text, _, self._buffer = self._buffer.partition(b"\n")
            self.lines.append(text.decode(errors="replace"))
            return self.lines[-1]
        raise AssertionError(f"kernel peer silent for {timeout} s; output so far: {self.lines}")

    async def expect(self, word: str, timeout: float = 30) -> list[str]:
        """The next line, split; it must start with `word`."""
        text = await self.line(timeout)
        fields = text.split()
        if not fields or fields[0] != word:
            raise AssertionError(f"kernel peer: expected {word!r}, got {text!r}; "
                                 f"output so far: {self.lines}; argv {self.argv}")
        return fields

    async def tell(self, text: str = "go") -> None:
        """Write one line to the peer's stdin (ends a `wait` step)."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")


@contextlib.asynccontextmanager
async def open_kernel_peer(ns: netns.Netns, *args: str) -> AsyncIterator[KernelPeer]:
    """Start tun_peer.py in `ns`; kill it on exit if it is still running."""
    argv = ns.argv([sys.executable, "-u", str(PEER_SCRIPT), *args])
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT)
    try:
        yield KernelPeer(process, argv)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                if process.returncode is None:
                    process.kill()
                await process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    await pipe.aclose()
