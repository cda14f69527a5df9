"""Where a proxied connection goes: through the user-space stack or through the OS.

A destination is "interesting" when it is a name or alias in hostnameMap, a VIP, an
address covered by a route (by CIDR, or learned from a route's hostname glob), or a name
matching a route's glob. Interesting destinations are dialled through the stack (the
data plane passes `NetStack.connect`); everything else goes out through the OS network
like any proxy would.

Names matching a route's glob are resolved by the `via` host's built-in DNS, reached
through the stack (TCP to VIP:10053); the addresses learned are remembered and reported
to the manager (a `routeSuggestion` event) so its packets for them go to `via`.

Also here: `ByteReader` (exact reads over a trio stream, for the DNS and SOCKS parsers)
and `splice` (join two streams, half-close aware), shared by the proxies.
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import trio

from norouter_trio.messages import ConfigureArgs, RouteSuggestion

log = logging.getLogger(__name__)

StreamConnect = Callable[[str, int], Awaitable[trio.abc.Stream]]
"""`async (host_or_ip, port) -> stream`: the stack's `connect`, or an OS dialer."""

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

    `stack_connect` is `NetStack.connect` in production; tests pass any
    `async (ip, port) -> Stream`. All dials are bounded by `connect_timeout`.
    """

    def __init__(
        self,
        stack_connect: StreamConnect,
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
    def from_args(cls, args: ConfigureArgs, stack_connect: StreamConnect,
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

    async def dial(self, host: str, port: int) -> trio.abc.Stream:
        """Connect to host:port through the stack or the OS; raises `DialError`."""
        name = normalize_host(host)
        if not name:
            raise DialError(host, port, "empty host name", "resolve")
        if not 0 < port < 65536:
            raise DialError(host, port, "bad port", "unreachable")
        try:
            with trio.fail_after(self.connect_timeout):
                return await self._dial(name, port)
        except trio.TooSlowError:
            raise DialError(host, port, f"no answer within {self.connect_timeout:g}s",
                            "timeout") from None

    async def _dial(self, name: str, port: int) -> trio.abc.Stream:
        if _ipv4(name) is not None:
            if self.is_interesting_ip(name):
                return await self._via_stack(name, name, port)
            return await self._via_os(name, port)
        if _is_ipv6(name):
            return await self._via_os(name, port)  # the virtual network is IPv4-only
        vip = self.hostname_map.get(name)
        if vip is not None:
            return await self._via_stack(name, vip, port)
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
                    return await self._via_stack(name, ip, port)
                except DialError as exc:
                    last = exc
            assert last is not None
            raise last
        return await self._via_os(name, port)

    async def _via_stack(self, name: str, ip: str, port: int) -> trio.abc.Stream:
        log.debug("dial %s:%d via stack (%s)", name, port, ip)
        try:
            stream = await self._stack_connect(ip, port)
        except ConnectionRefusedError:
            raise DialError(name, port, "connection refused", "refused") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise DialError(name, port, f"virtual network: {exc or 'no answer'}",
                            "unreachable") from None
        except OSError as exc:
            code, reason = _classify_os_error(exc)
            raise DialError(name, port, reason, code) from None
        set_nodelay = getattr(stream, "set_nodelay", None)
        if callable(set_nodelay):
            set_nodelay(True)
        return stream

    async def _via_os(self, name: str, port: int) -> trio.abc.Stream:
        log.debug("dial %s:%d via OS", name, port)
        try:
            return await self._os_connect(name, port)
        except OSError as exc:
            code, reason = _classify_os_error(exc)
            raise DialError(name, port, reason, code) from None
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


def parse_listen(value: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` of `http.listen` / `socks.listen` -> (host, port); ValueError names it."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:18080)")
    return host or "127.0.0.1", int(port)


# -- stream helpers -----------------------------------------------------------------------


class ShortRead(EOFError):
    """The peer closed the stream in the middle of something we had to read whole."""


class ByteReader:
    """Exact-size and delimited reads over a trio stream, keeping the read-ahead."""

    def __init__(self, stream: trio.abc.ReceiveStream, chunk: int = 65536) -> None:
        self.stream = stream
        self._chunk = chunk
        self._buf = bytearray()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(self._chunk)
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


async def splice(a: trio.abc.Stream, b: trio.abc.Stream, *, a_to_b_first: bytes = b"") -> None:
    """Copy both ways until both directions end; EOF is passed on as a half-close.

    A reset or error on either side ends both directions. Closes both streams.
    """
    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, first: bytes,
                   scope: trio.CancelScope) -> None:
        try:
            if first:
                await dst.send_all(first)
            while True:
                data = await src.receive_some(SPLICE_CHUNK)
                if not data:
                    break
                await dst.send_all(data)
            if isinstance(dst, trio.abc.HalfCloseableStream):
                await dst.send_eof()
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("splice ended: %s", exc or type(exc).__name__)
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, a, b, a_to_b_first, nursery.cancel_scope)
            nursery.start_soon(pump, b, a, b"", nursery.cancel_scope)
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)
