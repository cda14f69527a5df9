"""The agent's data plane: the stack for `me`, forwards, loopback mode and bastion mode.

Started by the agent entry after a configure request (``run_dataplane``). Everything that
can fail on the user's machine (binding the OS listeners of loopback mode) is done before
``task_status.started()``, so a bad configuration becomes an error result naming the
address instead of a half-working agent. Every connection runs in its own task group:
two pumps (``pump.join``) with half-close and resets carried through.

- forwards: stack listener on VIP:LISTEN_PORT -> OS connection to CONNECT_HOST:PORT
- loopback: OS listener on each `others` IP:PORT and name server -> stack connection to
  the same address (what the client already sent rides on the handshake's ACK); own
  forwards also on the real VIP:LISTEN_PORT -> the target directly
- bastion: a SYN for an address that is not the VIP -> OS connection to that address
  first, then accept in the stack (or refuse with RST when the OS connect fails); the
  stack absorbs retransmitted SYNs meanwhile, and each SYN has its own decision task
- services: built-in DNS on VIP:10053 in the stack (and on the real VIP:10053 in loopback
  mode, served directly), HTTP / SOCKS proxies on their OS addresses, the state dir.
  Each is guarded: a failing one is logged and the forwards keep working.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from norouter_trio.agent.pump import (
    STREAM_ERRORS,
    JoinResult,
    join,
    read_available,
    reset_and_close,
)
from norouter_trio.messages import ConfigureArgs, Forward

if TYPE_CHECKING:
    from norouter_trio.agent.main import AgentLink
    from norouter_trio.tcp.netstack import NetStack, PendingConnection, TCPStream

log = logging.getLogger("norouter_trio.agent.dataplane")

#: Bound on an OS connect (forward targets, bastion destinations). The peer's connection
#: is reset when it passes, instead of hanging for the kernel's two minutes.
OS_CONNECT_TIMEOUT = 20.0
#: Bound on a stack connect (loopback mode): the far agent may be gone.
STACK_CONNECT_TIMEOUT = 20.0
#: The built-in DNS server's port on every VIP (behaviour.md: nameServers).
DNS_PORT = 10053
#: Stack send buffer per connection. The receive buffer (the window) stays at the stack's
#: 2 MiB; the send buffer only needs the bandwidth-delay product of a stdio link (a few
#: hundred KB at most), and a smaller one bounds what each stalled connection pins:
#: 8 busy connections cost ~30 MB less RSS than with 2 MiB (bench/e2e_bench.py).
SEND_BUFFER = 512 * 1024
#: Backlog of the OS listeners of loopback mode.
OS_BACKLOG = 512
#: Most bytes of a new loopback client's data read before the stack connection is
#: opened (they ride on the handshake's ACK): one segment's worth.
FIRST_READ = 64 * 1024


class DataplaneError(Exception):
    """The data plane cannot start as configured; the message says what to change."""


def _is_bsd() -> bool:
    return sys.platform == "darwin" or "bsd" in sys.platform or "dragonfly" in sys.platform


def listen_error(ip: str, port: int, why: str, e: OSError) -> DataplaneError:
    """A listen failure as the user should read it: address, purpose, what to do. (No
    host prefix: the agent entry and the manager put "NAME(VIP): ..." in front.)"""
    text = f"cannot listen on {ip}:{port} ({why}): {e.strerror or e}"
    if e.errno == errno.EADDRINUSE:
        text += ("; another process (or another agent on this machine) already uses it: "
                 "stop it, or set `loopback: {disable: true}` for this host")
    elif e.errno == errno.EADDRNOTAVAIL and _is_bsd():
        text += f"; hint: try running `sudo ifconfig lo0 alias {ip}`"
    elif e.errno == errno.EACCES:
        text += "; ports below 1024 need privileges: choose a higher LISTEN_PORT"
    return DataplaneError(text)


async def open_os_listener(ip: str, port: int, why: str) -> trio.SocketListener:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind((ip, port))
        sock.listen(OS_BACKLOG)
    except OSError as e:
        sock.close()
        raise listen_error(ip, port, why, e) from None
    return trio.SocketListener(sock)


@functools.lru_cache(maxsize=256)
def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


async def open_os_stream(host: str, port: int) -> trio.SocketStream:
    """OS connection in bounded time. An IPv4 address is connected directly (half the CPU
    of `open_tcp_stream`, which counts at hundreds of new connections a second); a host
    name goes through `open_tcp_stream`, resolved in a thread by trio's getaddrinfo."""
    if _is_ipv4(host):
        return await _connect_ipv4(host, port)
    with trio.CancelScope(deadline=trio.current_time() + OS_CONNECT_TIMEOUT) as scope:
        stream = await trio.open_tcp_stream(host, port)
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
        return stream
    assert scope.cancelled_caught
    raise TimeoutError(f"connect to {host}:{port} timed out after {OS_CONNECT_TIMEOUT:g}s")


async def _connect_ipv4(host: str, port: int) -> trio.SocketStream:
    """A non-blocking connect that waits in trio only when it must. A connect on this
    machine (loopback, the usual forward target) has finished by the time connect()
    returns EINPROGRESS: then there is no readiness wait (a scheduling pass and a task
    step per connection), and no cancel scope for the deadline either."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            if not _connect_done(sock):
                with trio.CancelScope(
                        deadline=trio.current_time() + OS_CONNECT_TIMEOUT) as scope:
                    await trio.lowlevel.wait_writable(sock)
                if scope.cancelled_caught:
                    raise TimeoutError(f"connect to {host}:{port} timed out after "
                                       f"{OS_CONNECT_TIMEOUT:g}s") from None
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"cannot connect to {host}:{port}: {os.strerror(err)}") \
                    from None
        except OSError as e:  # refused or unreachable at once: name the address too
            if e.errno is None:
                raise
            raise OSError(e.errno, f"cannot connect to {host}:{port}: {e.strerror}") \
                from None
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))  # sets TCP_NODELAY
    except BaseException:
        sock.close()
        raise


def _connect_done(sock: socket.socket) -> bool:
    """True once a non-blocking connect has finished, well or not (writable, or an error
    pending), without waiting: one poll() call."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


#: accept() errors that concern one client only (as trio's SocketListener skips them).
_ACCEPT_RETRY = frozenset(getattr(errno, n) for n in (
    "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, n))

#: Builds a connection's description for a log line only when one is written: at
#: hundreds of connections a second the f-strings (and a getpeername) add up.
Describe = Callable[[], str]


def _fmt(addr: Any) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except (TypeError, IndexError):
        return str(addr)


class DataPlane:
    """One agent's forwards, loopback listeners and bastion handler, sharing one nursery."""

    def __init__(self, args: ConfigureArgs, link: AgentLink, stack: NetStack) -> None:
        self.args = args
        self.link = link
        self.stack = stack
        self.label = link.host_label or args.me
        self.nursery: trio.Nursery | None = None
        self.counters = {"connections": 0, "active": 0, "refused": 0, "reset": 0}
        self.dialer: Any = None

    # -- one joined connection
    async def _joined(self, kind: str, a: trio.abc.HalfCloseableStream,
                      b: trio.abc.HalfCloseableStream, desc: Describe, *,
                      sent: int = 0) -> None:
        """Join a and b (`sent`: bytes of a already passed to b, for the log line)."""
        self.counters["connections"] += 1
        self.counters["active"] += 1
        start = time.monotonic()
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            log.debug("%s: %s %s: open", self.label, kind, desc())
        for s in (a, b):
            # No Nagle in a relay (TCP_NODELAY on the OS side: trio's SocketStream sets
            # it; set_nodelay on the stack side). The bytes come already segmented by
            # the real sender, whose own stack applied Nagle or not as its application
            # chose; a second Nagle here would hold each small write while an earlier
            # one is unacknowledged, and that ACK may itself wait for the far side's
            # delayed-ACK timer (TCPConfig.delayed_ack, 40 ms): up to 40 ms per
            # request/response exchange that writes twice (headers then body). Nagle
            # stays on for the stack's own writers (DNS, proxies), as the spec says.
            set_nodelay = getattr(s, "set_nodelay", None)
            if set_nodelay is not None:
                set_nodelay(True)
        result = JoinResult()
        try:
            result = await join(a, b)
        finally:
            self.counters["active"] -= 1
        result.a_to_b += sent
        secs = time.monotonic() - start
        if result.error:
            self.counters["reset"] += 1
            log.info("%s: %s %s: reset after %d/%d bytes, %.1fs (%s)", self.label, kind,
                     desc(), result.a_to_b, result.b_to_a, secs, result.error)
        elif debug:
            log.debug("%s: %s %s: closed, %d bytes out, %d back, %.1fs", self.label, kind,
                      desc(), result.a_to_b, result.b_to_a, secs)

    def _refused(self, kind: str, desc: Describe, e: BaseException) -> None:
        self.counters["refused"] += 1
        log.warning("%s: %s %s: %s", self.label, kind, desc(), e or type(e).__name__)

    # -- forwards: stack listener -> OS
    async def serve_forward(self, listener: trio.abc.Listener[Any], fw: Forward) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except trio.ClosedResourceError:  # the stack has stopped
                    return
                self._spawn(self._forward_conn, stream, fw)

    async def _forward_conn(self, stream: trio.abc.HalfCloseableStream, fw: Forward) -> None:
        def desc() -> str:
            return (f"{_fmt(getattr(stream, 'remote_address', '?'))} -> "
                    f"{self.args.me}:{fw.listen_port} -> {fw.connect_ip}:{fw.connect_port}")

        await self._join_target("forward", stream, fw, desc)

    async def _join_target(self, kind: str, stream: trio.abc.HalfCloseableStream,
                           fw: Forward, desc: Describe) -> None:
        """Connect to the forward's target through the OS and join it to `stream`; a
        refused target resets `stream` at once, so the client is not left hanging."""
        try:
            target = await open_os_stream(fw.connect_ip, fw.connect_port)
        except OSError as e:
            self._refused(kind, desc, e)
            await reset_and_close(stream)
            return
        await self._joined(kind, stream, target, desc)

    # -- loopback mode: OS listener -> stack (others, name servers)
    async def serve_loopback_other(self, listener: trio.SocketListener, ip: str,
                                   port: int) -> None:
        async with listener:
            while True:
                sock, peer = await self._accept_os(listener)
                self._spawn(self._loopback_other_conn, sock, peer, ip, port)

    async def _loopback_other_conn(self, sock: trio.SocketStream, peer: Any, ip: str,
                                   port: int) -> None:
        def desc() -> str:
            return f"{_fmt(peer)} -> {ip}:{port} (loopback)"

        try:
            # What the client already sent (a request usually arrives with the
            # connection) goes out with the handshake's ACK: one frame less per connection.
            first = read_available(sock, FIRST_READ)
        except OSError as e:  # the client reset before we got to it
            log.debug("%s: loopback %s: client gone before connecting: %s", self.label,
                      desc(), e)
            await trio.aclose_forcefully(sock)
            return
        stream: TCPStream | None = None
        why: BaseException | None = None
        # A bare scope rather than fail_after: no generator-based context manager.
        with trio.CancelScope(deadline=trio.current_time() + STACK_CONNECT_TIMEOUT):
            try:
                stream = await self.stack.connect(ip, port, initial_data=first, nodelay=True)
            except (OSError, *STREAM_ERRORS) as e:
                why = e
        if stream is None:
            self._refused("loopback", desc, why or TimeoutError(
                f"no answer from {ip}:{port} within {STACK_CONNECT_TIMEOUT:g}s"))
            await reset_and_close(sock)
            return
        await self._joined("loopback", sock, stream, desc, sent=len(first))

    # -- loopback mode: own forwards on the real VIP -> target directly
    async def serve_loopback_own(self, listener: trio.SocketListener, fw: Forward) -> None:
        async with listener:
            while True:
                sock, peer = await self._accept_os(listener)
                self._spawn(self._loopback_own_conn, sock, peer, fw)

    async def _loopback_own_conn(self, sock: trio.SocketStream, peer: Any,
                                 fw: Forward) -> None:
        def desc() -> str:
            return (f"{_fmt(peer)} -> {self.args.me}:{fw.listen_port} -> "
                    f"{fw.connect_ip}:{fw.connect_port} (loopback)")

        await self._join_target("loopback", sock, fw, desc)

    async def _accept_os(self, listener: trio.SocketListener) -> tuple[trio.SocketStream, Any]:
        """Accept on the listener's socket directly: accept4 returns the peer's address,
        which the log lines then need no getpeername for."""
        while True:
            try:
                sock, peer = await listener.socket.accept()
                return trio.SocketStream(sock), peer
            except OSError as e:  # EMFILE and friends: wait, do not spin or die
                if e.errno in _ACCEPT_RETRY:  # the client gave up first: next one
                    continue
                if e.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the listener was closed") from None
                log.warning("%s: accept on %s failed: %s", self.label,
                            _fmt(listener.socket.getsockname()), e)
                await trio.sleep(0.1)

    # -- bastion mode: a SYN for someone else's address
    async def on_pending(self, pending: PendingConnection) -> None:
        """Called by the stack, in a task of its own, for each SYN to an address without a
        listener: decide (connect through the OS first) and then carry the connection."""
        await self._bastion_conn(pending)

    async def _bastion_conn(self, pending: PendingConnection) -> None:
        ip, port = pending.local
        def desc() -> str:
            return f"{_fmt(pending.remote)} -> {ip}:{port} (bastion)"

        if ip == self.args.me:
            pending.refuse()  # our own VIP with nothing listening: a plain refusal
            return
        try:
            target = await open_os_stream(ip, port)
        except OSError as e:
            self._refused("bastion", desc, e)
            pending.refuse()
            return
        try:
            stream = await pending.accept()
        except STREAM_ERRORS as e:
            self._refused("bastion", desc, e)
            await reset_and_close(target)
            return
        await self._joined("bastion", stream, target, desc)

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(fn, *args)

    # -- set-up
    async def open_loopback_listeners(self) -> list[tuple[str, trio.SocketListener, Any]]:
        """Bind every OS listener of loopback mode first: any failure aborts the start.
        Returns (kind, listener, what): ("own", l, Forward), ("other", l, (ip, port)),
        ("dns", l, None) for our own name server."""
        made: list[tuple[str, trio.SocketListener, Any]] = []
        seen: set[tuple[str, int]] = set()
        me = self.args.me
        try:
            for fw in self.args.forwards:
                if (me, fw.listen_port) in seen:
                    continue
                seen.add((me, fw.listen_port))
                lst = await open_os_listener(
                    me, fw.listen_port,
                    f"loopback mode, own forward to {fw.connect_ip}:{fw.connect_port}")
                made.append(("own", lst, fw))
            others = [(o, "loopback mode, another host's port") for o in self.args.others]
            others += [(o, "loopback mode, name server") for o in self.args.name_servers]
            for o, why in others:
                if (o.proto or "tcp") != "tcp" or (o.ip, o.port) in seen:
                    continue
                seen.add((o.ip, o.port))
                lst = await open_os_listener(o.ip, o.port, why)
                own_dns = o.ip == me and o.port == DNS_PORT
                made.append(("dns", lst, None) if own_dns else ("other", lst, (o.ip, o.port)))
        except BaseException:
            for _, lst, _ in made:
                await trio.aclose_forcefully(lst)
            raise
        return made

    async def start_services(self, dns_os_listener: trio.SocketListener | None) -> None:
        """DNS, the HTTP and SOCKS proxies and the state dir: optional parts, each guarded
        so that a missing or failing one is a logged error while forwards keep working."""
        assert self.nursery is not None
        nursery, args, label = self.nursery, self.args, self.label
        own_dns = any(ns.ip == args.me for ns in args.name_servers)
        try:
            from norouter_trio.agent.dns import serve_dns
        except ImportError as e:
            if own_dns:
                log.warning("%s: built-in DNS not available: %s", label, e)
        else:
            if own_dns:
                try:
                    nursery.start_soon(serve_dns, self.stack.listen(args.me, DNS_PORT),
                                       args.hostname_map)
                except Exception as e:  # e.g. a forward already uses port 10053
                    log.error("%s: built-in DNS not started on %s:%d: %s", label, args.me,
                              DNS_PORT, e)
            if dns_os_listener is not None:
                nursery.start_soon(serve_dns, dns_os_listener, args.hostname_map)
                dns_os_listener = None
        if dns_os_listener is not None:  # no DNS here: pass it to the stack like the rest
            nursery.start_soon(self.serve_loopback_other, dns_os_listener, args.me, DNS_PORT)
        for what, listen in (("http", args.http_listen), ("socks", args.socks_listen)):
            if listen:
                try:
                    await self._start_proxy(what, listen)
                except (DataplaneError, ImportError, ValueError) as e:
                    log.error("%s: %s proxy not started: %s", label, what, e)
        if not args.state_dir_disable or args.write_etc_hosts:
            try:
                from norouter_trio.agent.statedir import start_statedir
                await start_statedir(args, self.stack, self.link, nursery)
            except Exception as e:  # a warning by design (behaviour.md: state directory)
                log.warning("%s: state directory / hosts not written: %s", label, e)

    async def _start_proxy(self, what: str, listen: str) -> None:
        from norouter_trio.agent.dialer import Dialer

        host, sep, port_text = listen.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"{what}.listen {listen!r} is not IP:PORT")
        # ":PORT" means every interface, as Go's net.Listen reads it.
        lst = await open_os_listener(host.strip("[]") or "0.0.0.0", int(port_text),
                                     f"{what} proxy ({what}.listen)")
        if self.dialer is None:
            self.dialer = Dialer.from_args(self.args, self.stack.connect, self.link.send_event,
                                           label=self.label)
        assert self.nursery is not None
        if what == "http":
            from norouter_trio.agent.http_proxy import serve_http_proxy
            self.nursery.start_soon(serve_http_proxy, lst, self.dialer)
        else:
            from norouter_trio.agent.socks import serve_socks
            self.nursery.start_soon(serve_socks, lst, self.dialer)
        log.info("%s: %s proxy on %s", self.label, what, listen)


async def _run_stack(stack: NetStack, inbound: trio.MemoryReceiveChannel[bytes],
                     scope: trio.CancelScope, label: str, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The stack; when its packets end (the manager link is gone) the data plane ends too,
    rather than leaving loopback listeners that could only fail."""
    await stack.run(inbound, task_status=task_status)
    log.info("%s: no more packets from the manager; stopping the data plane", label)
    scope.cancel()


async def run_dataplane(args: ConfigureArgs, link: AgentLink, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the data plane for `args.me` until cancelled. Raises ``DataplaneError`` before
    ``started()`` when it cannot start as configured (e.g. a loopback address in use)."""
    from norouter_trio.tcp.connection import TCPConfig
    from norouter_trio.tcp.netstack import NetStack

    label = link.host_label or args.me
    for fw in args.forwards:
        if (fw.proto or "tcp") != "tcp":
            raise DataplaneError(f"forward {fw.listen_port}:{fw.connect_ip}:"
                                 f"{fw.connect_port}: only tcp is supported, not {fw.proto!r}")
    stack = NetStack(args.me, link.outbound, config=TCPConfig(send_buffer=SEND_BUFFER))
    dp = DataPlane(args, link, stack)
    listeners = [] if args.loopback_disable else await dp.open_loopback_listeners()
    try:
        async with trio.open_nursery() as nursery:
            dp.nursery = nursery
            await nursery.start(_run_stack, stack, link.inbound, nursery.cancel_scope, label)
            ports: set[int] = set()
            for fw in args.forwards:
                if fw.listen_port in ports:
                    log.warning("%s: forward %d:%s:%d ignored: port %d is already forwarded",
                                label, fw.listen_port, fw.connect_ip, fw.connect_port,
                                fw.listen_port)
                    continue
                ports.add(fw.listen_port)
                nursery.start_soon(dp.serve_forward, stack.listen(args.me, fw.listen_port), fw)
            dns_os_listener = None
            for kind, lst, what in listeners:
                if kind == "own":
                    nursery.start_soon(dp.serve_loopback_own, lst, what)
                elif kind == "other":
                    nursery.start_soon(dp.serve_loopback_other, lst, *what)
                else:
                    dns_os_listener = lst
            listeners = []
            stack.accept_any(dp.on_pending)
            await dp.start_services(dns_os_listener)
            log.info("%s: data plane up: %d forward(s), loopback %s", label,
                     len(ports), "off" if args.loopback_disable else "on")
            task_status.started()
    finally:
        for _, lst, _ in listeners:
            with contextlib.suppress(*STREAM_ERRORS):
                await trio.aclose_forcefully(lst)
