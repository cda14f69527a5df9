"""Built-in DNS over TCP (VIP:10053 in the stack, 127.0.42.x:10053 in loopback mode).

A/IN questions for names and aliases in hostnameMap are answered here, so every host
can resolve every other host by name. Anything else is relayed to the host's own
resolvers (/etc/resolv.conf: UDP first, TCP when the answer is truncated or UDP gets
none), which is what lets a route's `via` host resolve names only it can see.

Messages are parsed and built with dnspython; only the 2-byte TCP length framing and a
header-only FORMERR (for input dnspython cannot parse) are done by hand.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import trio

from norouter_trio.agent.dialer import ByteReader, load_dnspython, normalize_host

if TYPE_CHECKING:  # imported on the first query: see load_dnspython
    import dns.flags
    import dns.message
    import dns.opcode
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset

log = logging.getLogger(__name__)

Resolver = tuple[str, int]

RESOLV_CONF = "/etc/resolv.conf"
_HEADER = struct.Struct("!HHHHHH")
# Header bits and codes of RFC 1035 §4.1.1, for the replies built without dnspython.
_QR, _RD, _TC, _OPCODE_MASK, _FORMERR = 0x8000, 0x0100, 0x0200, 0x7800, 1


def read_resolv_conf(path: str | os.PathLike[str] = RESOLV_CONF) -> list[Resolver]:
    """The `nameserver` lines of a resolv.conf, on port 53.

    A missing or empty file means 127.0.0.1, as for the C library.
    """
    servers: list[Resolver] = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        log.warning("cannot read %s (%s): relaying DNS to 127.0.0.1", path, exc.strerror)
        text = ""
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            addr = fields[1]
            try:
                ipaddress.ip_address(addr.split("%", 1)[0])
            except ValueError:
                log.warning("%s: ignoring nameserver %r (not an IP address)", path, addr)
                continue
            servers.append((addr, 53))
    return servers or [("127.0.0.1", 53)]


def formerr_for(wire: bytes) -> bytes | None:
    """A header-only FORMERR answer for unparsable input, or None if it has no header."""
    if len(wire) < _HEADER.size:
        return None
    qid, flags = struct.unpack_from("!HH", wire)
    if flags & _QR:
        return None  # a response sent to a server: never answer those
    flags = _QR | (flags & (_OPCODE_MASK | _RD)) | _FORMERR
    return _HEADER.pack(qid, flags, 0, 0, 0, 0)


class DNSResponder:
    """Answers one DNS message (wire format) locally or by relaying it upstream."""

    def __init__(self, hostname_map: Mapping[str, str], resolvers: Sequence[Resolver], *,
                 ttl: int = 60, attempt_timeout: float = 2.0,
                 total_timeout: float = 5.0) -> None:
        self.names = {normalize_host(k): v for k, v in hostname_map.items()}
        self.resolvers = list(resolvers)
        self.ttl = ttl
        self.attempt_timeout = attempt_timeout
        self.total_timeout = total_timeout

    async def respond(self, wire: bytes) -> bytes | None:
        """The answer to send back, or None to send nothing (input not worth an answer)."""
        await load_dnspython(globals())
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # garbage of any kind must not hurt the server
            log.debug("DNS: unparsable message (%d bytes): %s", len(wire), exc)
            return formerr_for(wire)
        if query.flags & dns.flags.QR:
            return None
        if query.opcode() != dns.opcode.QUERY:
            return self._error(query, dns.rcode.NOTIMP)
        if len(query.question) != 1:
            return self._error(query, dns.rcode.FORMERR)
        local = self._answer_locally(query)
        if local is not None:
            return local
        return await self.relay(query, wire)

    def _error(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        response.set_rcode(rcode)
        return response.to_wire()

    def _answer_locally(self, query: dns.message.Message) -> bytes | None:
        q = query.question[0]
        if q.rdclass != dns.rdataclass.IN:
            return None
        vip = self.names.get(normalize_host(q.name.to_text(omit_final_dot=True)))
        if vip is None:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        if q.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            response.answer.append(dns.rrset.from_text(q.name, self.ttl, "IN", "A", vip))
        # Other types for a known name: NOERROR with no answer (the name exists).
        log.debug("DNS: %s %s -> %s", q.name, dns.rdatatype.to_text(q.rdtype),
                  vip if response.answer else "no data")
        return response.to_wire()

    async def relay(self, query: dns.message.Message, wire: bytes) -> bytes:
        """Ask each resolver in turn; SERVFAIL with an empty answer if all of them fail."""
        await load_dnspython(globals())
        fallback: bytes | None = None
        with trio.move_on_after(self.total_timeout):
            for server in self.resolvers:
                answer = await self._ask(server, query.id, wire)
                if answer is None:
                    continue
                rcode = struct.unpack_from("!H", answer, 2)[0] & 0x000F
                if rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                    fallback = answer
                    continue
                return answer
        if fallback is not None:
            return fallback
        q = query.question[0]
        log.info("DNS: no resolver answered %s %s (%s)", q.name,
                 dns.rdatatype.to_text(q.rdtype),
                 ", ".join(f"{ip}:{port}" for ip, port in self.resolvers))
        return self._error(query, dns.rcode.SERVFAIL)

    async def _ask(self, server: Resolver, qid: int, wire: bytes) -> bytes | None:
        truncated: bytes | None = None
        try:
            answer = await self._ask_udp(server, qid, wire)
        except (OSError, trio.TooSlowError) as exc:
            log.debug("DNS: UDP to %s:%d failed: %s", *server, exc or "timeout")
            answer = None
        if answer is not None:
            if not struct.unpack_from("!H", answer, 2)[0] & _TC:
                return answer
            truncated = answer
        try:
            return await self._ask_tcp(server, qid, wire)
        except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.debug("DNS: TCP to %s:%d failed: %s", *server, exc or "timeout")
            return truncated

    async def _ask_udp(self, server: Resolver, qid: int, wire: bytes) -> bytes | None:
        family = trio.socket.AF_INET6 if ":" in server[0] else trio.socket.AF_INET
        with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock, \
                trio.fail_after(self.attempt_timeout):
            await sock.connect(server)
            await sock.send(wire)
            for _ in range(64):  # skip stray datagrams, boundedly
                data = await sock.recv(65535)
                if len(data) >= _HEADER.size and struct.unpack_from("!H", data)[0] == qid:
                    return data
        return None

    async def _ask_tcp(self, server: Resolver, qid: int, wire: bytes) -> bytes | None:
        with trio.fail_after(self.attempt_timeout):
            stream = await trio.open_tcp_stream(*server)
            async with stream:
                await stream.send_all(len(wire).to_bytes(2, "big") + wire)
                reader = ByteReader(stream)
                for _ in range(8):
                    size = int.from_bytes(await reader.read_exactly(2), "big")
                    data = await reader.read_exactly(size)
                    if len(data) >= _HEADER.size and struct.unpack_from("!H", data)[0] == qid:
                        return data
        return None


async def handle_dns_connection(stream: trio.abc.Stream, responder: DNSResponder, *,
                                idle_timeout: float = 30.0, max_in_flight: int = 16) -> None:
    """Serve length-prefixed queries on one TCP connection, answering them concurrently."""
    reader = ByteReader(stream)
    send_lock = trio.Lock()
    limiter = trio.CapacityLimiter(max_in_flight)

    async def answer(wire: bytes, token: object, scope: trio.CancelScope) -> None:
        try:
            out = await responder.respond(wire)
            if out is not None:
                async with send_lock:
                    await stream.send_all(len(out).to_bytes(2, "big") + out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()
        finally:
            limiter.release_on_behalf_of(token)

    try:
        async with trio.open_nursery() as nursery:
            while True:
                with trio.move_on_after(idle_timeout) as idle:
                    try:
                        size = int.from_bytes(await reader.read_exactly(2), "big")
                        wire = await reader.read_exactly(size)
                    except EOFError:
                        break  # the client is done; answers in flight still go out
                if idle.cancelled_caught:
                    nursery.cancel_scope.cancel()
                    break
                if not wire:
                    continue
                token = object()
                await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(answer, wire, token, nursery.cancel_scope)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("DNS connection ended: %s", exc or type(exc).__name__)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_dns(listener: trio.abc.Listener[trio.abc.Stream],
                    hostname_map: Mapping[str, str], *,
                    resolvers: Sequence[Resolver] | None = None,
                    resolv_conf: str | os.PathLike[str] = RESOLV_CONF,
                    ttl: int = 60, attempt_timeout: float = 2.0, total_timeout: float = 5.0,
                    idle_timeout: float = 30.0) -> NoReturn:
    """Serve DNS over TCP on `listener` forever (run it in the data plane's nursery).

    `hostname_map` (name or alias -> VIP) is answered locally; other questions go to
    `resolvers` ((ip, port) pairs), by default the nameservers of `resolv_conf`.
    Each relay attempt is bounded by `attempt_timeout`, a whole relay by `total_timeout`.
    """
    if resolvers is None:
        resolvers = read_resolv_conf(resolv_conf)
    responder = DNSResponder(hostname_map, resolvers, ttl=ttl,
                             attempt_timeout=attempt_timeout, total_timeout=total_timeout)

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            await handle_dns_connection(stream, responder, idle_timeout=idle_timeout)
        except Exception:
            log.exception("DNS: connection handler failed")

    await trio.serve_listeners(handler, [listener])
