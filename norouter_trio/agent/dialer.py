"""Where a proxied connection goes: through the user-space stack or through the OS.

A destination is "interesting" when it is a name or alias in hostnameMap, a VIP, an
address covered by a route (by CIDR, or learned from a route's hostname glob), or a name
matching a route's glob. Interesting destinations are dialled through the stack (the
data plane passes `NetStack.connect`); everything else goes out through the OS network
like any proxy would.

Names matching a route's glob are resolved by the `via` host's built-in DNS, reached
through the stack (TCP to VIP:10053); the addresses learned are remembered and reported
to the manager (a `routeSuggestion` event) so its packets for them go to `via`.

Also here, shared by the proxies: `ByteReader` (exact reads over a trio stream, for the
DNS and SOCKS parsers), `receiver` / `sender` (a client socket read and written on its
descriptor) and `splice` (join two streams, half-close aware: the data plane's pumps).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import importlib
import ipaddress
import logging
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol, TypeVar, cast

import trio

from norouter_trio.agent.pump import (
    STREAM_ERRORS,
    abort_stream,
    direct_receiver,
    direct_sender,
    join,
)
from norouter_trio.messages import ConfigureArgs, RouteSuggestion

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import dns.exception
    import dns.message
    import dns.rcode
    import dns.rdatatype

#: The dnspython modules the agent uses (its DNS server and routed-name lookups).
DNSPYTHON_MODULES = ("dns.exception", "dns.flags", "dns.message", "dns.opcode", "dns.rcode",
                     "dns.rdataclass", "dns.rdatatype", "dns.rrset")


async def load_dnspython(namespace: dict[str, Any]) -> None:
    """Import dnspython on first use, in a worker thread, and bind `dns` in `namespace`
    (a module's globals). It costs about 9 MB and 0.1 s: an agent that never sees a DNS
    query or a routed name never pays it, and the first one does not stall the loop."""
    if "dns" in namespace:
        return
    if any(m not in sys.modules for m in DNSPYTHON_MODULES):
        await trio.to_thread.run_sync(_import_dnspython)
    namespace["dns"] = sys.modules["dns"]


def _import_dnspython() -> None:
    for module in DNSPYTHON_MODULES:
        importlib.import_module(module)

StreamConnect = Callable[[str, int], Awaitable[trio.abc.Stream]]
"""`async (host_or_ip, port) -> stream`: an OS dialer."""


class StackConnect(Protocol):
    """`NetStack.connect`: `initial_data` is queued before the SYN and leaves with the
    handshake's ACK (one segment less per connection); `nodelay` turns Nagle off."""

    async def __call__(self, ip: str, port: int, *, initial_data: bytes = b"",
                       nodelay: bool = False) -> trio.abc.Stream: ...

SuggestRoute = Callable[[list[str], str], None]
"""`(ips, via_vip) -> None`: tell the manager to send packets for `ips` to `via_vip`."""

DialErrorCode = Literal["refused", "unreachable", "network", "resolve", "timeout"]

DNS_PORT = 10053
SPLICE_CHUNK = 256 * 1024
_MAX_ROUTED_IPS = 4096


class RouteLike(Protocol):
    """What the dialer reads from a `messages.Route` (lists may be None: JSON null)."""

    @property
    def via(self) -> str: ...
    @property
    def to_cidr(self) -> Sequence[str] | None: ...
    @property
    def to_hostname_glob(self) -> Sequence[str] | None: ...


class DialError(Exception):
    """A destination could not be reached. `str()` is short: it goes into a 502 body."""

    def __init__(self, host: str, port: int, reason: str, code: DialErrorCode) -> None:
        super().__init__(f"cannot reach {format_host_port(host, port)}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason
        self.code: DialErrorCode = code


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets: the form names are compared in."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".").lower()


def _ipv4(host: str) -> ipaddress.IPv4Address | None:
    if not host[:1].isdigit():
        return None  # a name (cheaper than the ValueError)
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        return None


def _is_ipv6(host: str) -> bool:
    if ":" not in host:
        return False
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def os_connect(host: str, port: int) -> trio.abc.Stream:
    """Dial through the OS network (name resolution by the OS, happy eyeballs)."""
    return await trio.open_tcp_stream(host, port)


def _classify_os_error(exc: BaseException) -> tuple[DialErrorCode, str]:
    """Map a connect failure (possibly trio's 'all attempts failed') to a code + reason."""
    causes: list[BaseException] = [exc]
    group = getattr(exc.__cause__, "exceptions", None)  # trio: "all attempts failed"
    if isinstance(group, Sequence):
        causes = [c for c in group if isinstance(c, BaseException)]
    for c in causes:
        if isinstance(c, socket.gaierror):
            return "resolve", f"name not resolved ({c.strerror or c})"
    for c in causes:
        if isinstance(c, ConnectionRefusedError):
            return "refused", "connection refused"
    for c in causes:
        if isinstance(c, TimeoutError):
            return "timeout", "connection timed out"
    for c in causes:
        if isinstance(c, OSError) and c.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL):
            return "network", "network unreachable"
    for c in causes:
        if isinstance(c, OSError) and c.strerror:
            return "unreachable", c.strerror.lower()
    return "unreachable", str(exc) or type(exc).__name__


class Dialer:
    """Chooses stack or OS for each destination and connects.

    `stack_connect` is `NetStack.connect` in production (tests pass a stand-in with the
    same keywords): the first bytes of a dial through the stack ride on the handshake's
    ACK. All dials are bounded by `connect_timeout`.
    """

    def __init__(
        self,
        stack_connect: StackConnect,
        *,
        hostname_map: Mapping[str, str],
        routes: Sequence[RouteLike] = (),
        vips: Iterable[str] = (),
        os_connect: StreamConnect = os_connect,
        suggest_route: SuggestRoute | None = None,
        connect_timeout: float = 15.0,
        dns_timeout: float = 5.0,
        dns_port: int = DNS_PORT,
        label: str = "",
    ) -> None:
        self._stack_connect = stack_connect
        self._os_connect = os_connect
        self._suggest_route = suggest_route
        self.connect_timeout = connect_timeout
        self.dns_timeout = dns_timeout
        self.dns_port = dns_port
        self.label = label
        self.hostname_map = {normalize_host(k): v for k, v in hostname_map.items()}
        self.vips = set(hostname_map.values()) | set(vips)
        self._cidrs: list[ipaddress.IPv4Network] = []
        self._globs: list[tuple[str, str]] = []  # (lower-case glob, via)
        for route in routes:
            for cidr in route.to_cidr or ():
                try:
                    self._cidrs.append(ipaddress.IPv4Network(cidr, strict=False))
                except ValueError:
                    log.warning("%s: route via %s: ignoring %r (not an IPv4 CIDR)",
                                label or "agent", route.via, cidr)
            for glob in route.to_hostname_glob or ():
                self._globs.append((normalize_host(glob), route.via))
        # Later routes win, as in the manager's table: search them last-first.
        self._globs.reverse()
        self._routed_ips: OrderedDict[str, str] = OrderedDict()  # ip -> via, bounded LRU
        self._name_cache: dict[str, tuple[list[str], float]] = {}  # name -> (ips, expiry)

    @classmethod
    def from_args(cls, args: ConfigureArgs, stack_connect: StackConnect,
                  send_event: Callable[[RouteSuggestion], None] | None = None,
                  **kwargs: Any) -> Dialer:
        """Build from the configure args; `send_event` is `AgentLink.send_event`."""
        vips = {args.me, *(ns.ip for ns in args.name_servers or ()),
                *(o.ip for o in args.others or ())}
        suggest: SuggestRoute | None = None
        if send_event is not None:
            def suggest(ips: list[str], via: str) -> None:
                send_event(RouteSuggestion(ip=ips, route=via))

        kwargs.setdefault("label", args.me)
        return cls(stack_connect, hostname_map=args.hostname_map or {},
                   routes=args.routes or (), vips=vips, suggest_route=suggest, **kwargs)

    # -- the choice -------------------------------------------------------------------

    def route_for_name(self, name: str) -> str | None:
        """The `via` VIP of the route whose glob matches `name`, if any."""
        name = normalize_host(name)
        for glob, via in self._globs:
            if fnmatch.fnmatchcase(name, glob):
                return via
        return None

    def is_interesting_ip(self, ip: str) -> bool:
        """A VIP, an address learned from a routed name, or inside a route's CIDR."""
        if ip in self.vips or ip in self._routed_ips:
            return True
        addr = _ipv4(ip)
        return addr is not None and any(addr in net for net in self._cidrs)

    def is_interesting(self, host: str) -> bool:
        host = normalize_host(host)
        if _ipv4(host) is not None:
            return self.is_interesting_ip(host)
        return host in self.hostname_map or self.route_for_name(host) is not None

    # -- dialling ---------------------------------------------------------------------

    async def dial(self, host: str, port: int, *,
                   initial_data: bytes = b"") -> trio.abc.Stream:
        """Connect to host:port through the stack or the OS and send `initial_data`
        (through the stack, on the handshake's ACK when it can); raises `DialError`."""
        name = normalize_host(host)
        if not name:
            raise DialError(host, port, "empty host name", "resolve")
        if not 0 < port < 65536:
            raise DialError(host, port, "bad port", "unreachable")
        # A bare scope rather than fail_after: no generator-based context manager per dial.
        with trio.CancelScope(deadline=trio.current_time() + self.connect_timeout):
            return await self._dial(name, port, initial_data)
        raise DialError(host, port, f"no answer within {self.connect_timeout:g}s", "timeout")

    async def _dial(self, name: str, port: int, first: bytes) -> trio.abc.Stream:
        if _ipv4(name) is not None:
            if self.is_interesting_ip(name):
                return await self._via_stack(name, name, port, first)
            return await self._via_os(name, port, first)
        if _is_ipv6(name):
            return await self._via_os(name, port, first)  # the virtual network is IPv4-only
        vip = self.hostname_map.get(name)
        if vip is not None:
            return await self._via_stack(name, vip, port, first)
        if len(name) > 253 or any(not 0 < len(label) < 64 for label in name.split(".")):
            # No resolver takes it (RFC 1035 §2.3.4); say so rather than fail inside one.
            raise DialError(name, port, "not a valid host name (labels of 1 to 63 bytes, "
                            "at most 253 in all)", "resolve")
        via = self.route_for_name(name)
        if via is not None:
            try:
                ips = await self.resolve_routed(name, via)
            except DialError as exc:
                raise DialError(name, port, exc.reason, exc.code) from None
            last: DialError | None = None
            for ip in ips:
                try:
                    return await self._via_stack(name, ip, port, first)
                except DialError as exc:
                    last = exc
            assert last is not None
            raise last
        return await self._via_os(name, port, first)

    async def _via_stack(self, name: str, ip: str, port: int, first: bytes) -> trio.abc.Stream:
        log.debug("dial %s:%d via stack (%s)", name, port, ip)
        try:
            return await self._stack_connect(ip, port, initial_data=first, nodelay=True)
        except ConnectionRefusedError:
            raise DialError(name, port, "connection refused", "refused") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise DialError(name, port, f"virtual network: {exc or 'no answer'}",
                            "unreachable") from None
        except OSError as exc:
            code, reason = _classify_os_error(exc)
            raise DialError(name, port, reason, code) from None

    async def _via_os(self, name: str, port: int, first: bytes) -> trio.abc.Stream:
        log.debug("dial %s:%d via OS", name, port)
        try:
            stream = await self._os_connect(name, port)
            if first:
                await _send_first(stream, first)
            return stream
        except OSError as exc:
            code, reason = _classify_os_error(exc)
            raise DialError(name, port, reason, code) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:  # first bytes
            raise DialError(name, port, f"closed at once: {exc or type(exc).__name__}",
                            "unreachable") from None
        except UnicodeError as exc:  # the resolver's IDNA encoding refused the name
            raise DialError(name, port, f"name not resolved ({exc})", "resolve") from None

    # -- routed names -----------------------------------------------------------------

    async def resolve_routed(self, name: str, via: str) -> list[str]:
        """A/IN addresses of `name` from via's built-in DNS; remembered and suggested."""
        now = time.monotonic()
        cached = self._name_cache.get(name)
        if cached is not None and cached[1] > now:
            ips = cached[0]
        else:
            ips, ttl = await self._query_via(name, via)
            self._name_cache[name] = (ips, now + min(max(ttl, 1), 300))
            if len(self._name_cache) > _MAX_ROUTED_IPS:
                self._name_cache.pop(next(iter(self._name_cache)))
        new = [ip for ip in ips if self._routed_ips.get(ip) != via]
        for ip in ips:
            self._routed_ips[ip] = via
            self._routed_ips.move_to_end(ip)
        while len(self._routed_ips) > _MAX_ROUTED_IPS:
            self._routed_ips.popitem(last=False)
        if new:
            log.info("route learned: %s -> %s (for %s)", ",".join(new), via, name)
            if self._suggest_route is not None:
                self._suggest_route(list(new), via)
        return ips

    async def _query_via(self, name: str, via: str) -> tuple[list[str], int]:
        await load_dnspython(globals())
        query = dns.message.make_query(name + ".", "A")
        wire = query.to_wire()
        try:
            with trio.fail_after(self.dns_timeout):
                stream = await self._stack_connect(via, self.dns_port)
                try:
                    await stream.send_all(len(wire).to_bytes(2, "big") + wire)
                    reader = ByteReader(stream)
                    for _ in range(8):
                        size = int.from_bytes(await reader.read_exactly(2), "big")
                        response = dns.message.from_wire(await reader.read_exactly(size))
                        if response.id == query.id:
                            break
                    else:
                        raise DialError(name, 0, f"DNS at {via}:{self.dns_port} answered "
                                        "other queries", "resolve")
                finally:
                    await trio.aclose_forcefully(stream)
        except trio.TooSlowError:
            raise DialError(name, 0, f"DNS at {via}:{self.dns_port} did not answer within "
                            f"{self.dns_timeout:g}s", "resolve") from None
        except (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                dns.exception.DNSException) as exc:
            raise DialError(name, 0, f"DNS at {via}:{self.dns_port} failed: "
                            f"{exc or type(exc).__name__}", "resolve") from None
        if response.rcode() != dns.rcode.NOERROR:
            raise DialError(name, 0, f"DNS at {via}: {dns.rcode.to_text(response.rcode())}",
                            "resolve")
        ips: list[str] = []
        ttl = 300
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.A:
                ttl = min(ttl, rrset.ttl)
                ips.extend(rd.address for rd in rrset)
        if not ips:
            raise DialError(name, 0, f"DNS at {via}: no A record", "resolve")
        return ips, ttl


async def _send_first(stream: trio.abc.Stream, data: bytes) -> None:
    """Send a dial's first bytes; a failure closes the new stream (the dial fails)."""
    try:
        await stream.send_all(data)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def parse_listen(value: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` of `http.listen` / `socks.listen` -> (host, port); ValueError names it."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:18080)")
    return host or "127.0.0.1", int(port)


# -- stream helpers -----------------------------------------------------------------------

Receive = Callable[[int], Awaitable[bytes | bytearray]]
Send = Callable[[bytes | bytearray], Awaitable[None]]


def receiver(stream: trio.abc.ReceiveStream) -> Receive:
    """`receive_some` for `stream`; an OS socket is read on its descriptor.

    trio's SocketStream yields to the scheduler after every call that succeeds (and goes
    through two context managers): a proxy handshake or tunnel pays a scheduling pass per
    read for nothing, since its next step (a dial, a send, a wait for more) yields anyway.
    Only the plain read is skipped: it still waits in trio, so timeouts and cancellation
    work as before. Errors are OSError (a reset) rather than BrokenResourceError.
    """
    if type(stream) is not trio.SocketStream:
        return stream.receive_some
    return direct_receiver(stream.socket.fileno())


def sender(stream: trio.abc.SendStream) -> Send:
    """`send_all` for `stream`; an OS socket is written on its descriptor (see `receiver`).
    A send that does not block does not yield."""
    if type(stream) is not trio.SocketStream:
        return stream.send_all
    return direct_sender(stream.socket.fileno())


class ShortRead(EOFError):
    """The peer closed the stream in the middle of something we had to read whole."""


class ByteReader:
    """Exact-size and delimited reads over a trio stream, keeping the read-ahead."""

    def __init__(self, stream: trio.abc.ReceiveStream, chunk: int = 65536) -> None:
        self.stream = stream
        self._receive = receiver(stream)
        self._chunk = chunk
        self._buf = bytearray()

    async def _fill(self) -> None:
        data = await self._receive(self._chunk)
        if not data:
            raise ShortRead(f"peer closed after {len(self._buf)} buffered bytes")
        self._buf += data

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_until(self, delim: bytes, limit: int) -> bytes:
        """Bytes up to (not including) `delim`, which is consumed; ValueError past `limit`."""
        start = 0
        while True:
            i = self._buf.find(delim, start)
            if i >= 0:
                out = bytes(self._buf[:i])
                del self._buf[: i + len(delim)]
                return out
            if len(self._buf) > limit:
                raise ValueError(f"no {delim!r} within {limit} bytes")
            start = max(0, len(self._buf) - len(delim) + 1)
            await self._fill()

    def take_buffered(self) -> bytes:
        """Whatever was read ahead (to forward before splicing)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out


#: accept() errors that mean "out of descriptors or memory for now": wait, then go on.
_ACCEPT_CAPACITY = frozenset(getattr(errno, n) for n in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")
                             if hasattr(errno, n))

S = TypeVar("S", bound=trio.abc.AsyncResource)


async def serve_streams(listener: trio.abc.Listener[S], handler: Callable[[S], Awaitable[None]],
                        what: str) -> NoReturn:
    """Accept forever; each stream goes to `handler` in a task of its own.

    As `trio.serve_listeners` for one listener, less per connection: no wrapper task
    frame and no forced close after the handler, which closes its stream itself on every
    path. Out of descriptors (EMFILE and friends), it logs and retries after 0.1 s.
    """
    async with listener, trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY:
                    raise
                log.error("%s: accept failed: %s; retrying in 0.1 s", what, exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(handler, stream)


async def splice(a: trio.abc.Stream, b: trio.abc.Stream, *, a_to_b_first: bytes = b"") -> None:
    """Copy both ways until both directions end; EOF is passed on as a half-close.

    The data plane's `pump.join`, as loopback mode uses it: one task per direction at
    most, an OS socket read or written on its descriptor. A reset or error on either side
    resets both (the far ends learn it, as from loopback mode). Closes both streams.
    """
    if a_to_b_first:
        try:
            await b.send_all(a_to_b_first)
        except BaseException as exc:
            if isinstance(exc, STREAM_ERRORS):
                log.debug("splice ended: %s", exc or type(exc).__name__)
            for s in (a, b):
                abort_stream(s)
                with contextlib.suppress(*STREAM_ERRORS):
                    await trio.aclose_forcefully(s)
            if isinstance(exc, STREAM_ERRORS):
                return
            raise
    # Both kinds of stream the proxies join are half-closeable (trio's SocketStream, the
    # stack's TCPStream); `pump` closes a destination that is not, after its EOF.
    result = await join(cast(trio.abc.HalfCloseableStream, a),
                        cast(trio.abc.HalfCloseableStream, b))
    if result.error is not None:
        log.debug("splice ended: %s", result.error)
