"""HTTP proxy on `http.listen`: absolute-URI requests and CONNECT tunnels.

Each destination is dialled through `Dialer` (stack for the virtual network, OS for the
rest). HTTP/1.1 parsing and framing on both sides is h11's; bodies (chunked or sized) are
streamed event by event, never buffered whole. One upstream connection is kept per client
connection and reused while the client keeps asking the same host:port.

Errors a client sees: 400 (malformed request, not an absolute http:// URI), 431 (request
head larger than `max_header_bytes`), 502 (destination unreachable, with the reason).
After an error the connection is closed; the proxy keeps serving everyone else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit

import h11
import trio

from norouter_trio.agent.dialer import (
    Dialer,
    DialError,
    format_host_port,
    parse_listen,
    shared_dialer,
    splice,
)
from norouter_trio.messages import ConfigureArgs

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
UPSTREAM_MAX_HEADERS = 256 * 1024
_COPY_LIMIT = 16 * 1024  # body pieces smaller than this are coalesced with the head
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"upgrade",
})
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

Headers = list[tuple[bytes, bytes]]


class BadRequest(Exception):
    """The request cannot be proxied; the message goes into the 400 body."""


def parse_absolute_uri(target: bytes) -> tuple[str, int, str, bytes]:
    """`http://host[:port]/path?q` -> (host, port, authority for Host:, origin-form target)."""
    text = target.decode("ascii", "replace")
    if text.startswith("/"):
        raise BadRequest("this is a proxy: the request target must be an absolute "
                         "http:// URI (or use CONNECT)")
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise BadRequest(f"unsupported scheme {parts.scheme or '(none)'!r}: only http:// "
                         "URIs are proxied, use CONNECT for others")
    try:
        host, port = parts.hostname, parts.port or 80
    except ValueError:
        raise BadRequest(f"bad port in {text!r}") from None
    if not host:
        raise BadRequest(f"no host in {text!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, port, parts.netloc.rpartition("@")[2], path.encode("ascii")


def parse_authority(target: bytes) -> tuple[str, int]:
    """`host:port` or `[v6]:port` (a CONNECT target) -> (host, port)."""
    text = target.decode("ascii", "replace")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequest(f"CONNECT target must be host:port, got {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise BadRequest(f"bad CONNECT target {text!r}")
        host = host[1:-1]
    return host, int(port_text)


class ParsedHeaders(Protocol):
    """h11's header list: lower-case (name, value) pairs, and the names as received."""

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]: ...
    def raw_items(self) -> list[tuple[bytes, bytes]]: ...


def end_to_end_headers(headers: ParsedHeaders,
                       *, drop: frozenset[bytes] = frozenset()) -> Headers:
    """Headers without the hop-by-hop ones (including those named in `Connection:`),
    with their names spelled as received."""
    named = {token.strip().lower() for name, value in headers if name == b"connection"
             for token in value.split(b",")}
    skip = _HOP_BY_HOP | named | drop
    return [(raw, value) for raw, value in headers.raw_items() if raw.lower() not in skip]


def _has_body(headers: Headers) -> bool:
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _head_size(request: h11.Request) -> int:
    return len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _as_bytes(data: bytes | bytearray) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


class _Upstream:
    """One upstream HTTP/1.1 connection, spoken through an h11 client."""

    def __init__(self, key: tuple[str, int], stream: trio.abc.Stream) -> None:
        self.key = key
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=UPSTREAM_MAX_HEADERS)
        self.used = False

    async def next_event(self, before_wait: _Flush) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                await before_wait()
                self.conn.receive_data(_as_bytes(await self.stream.receive_some(CHUNK)))
            elif event is h11.PAUSED:
                raise h11.RemoteProtocolError("upstream sent more than one response", 502)
            else:
                return event  # type: ignore[return-value]

    def reusable(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


class _Flush:
    """Send what the client side has queued (coalesces head + small bodies)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.out = bytearray()

    async def __call__(self) -> None:
        if self.out:
            data = bytes(self.out)
            self.out.clear()
            await self.stream.send_all(data)


@dataclass
class _Exchange:
    response_started: bool = False
    response_done: bool = False
    body_done: bool = False                          # forwarded whole to the upstream
    client_error: BaseException | None = None      # client broke or sent a bad body
    upstream_error: BaseException | None = None


class _ProxyConnection:
    def __init__(self, stream: trio.abc.Stream, dialer: Dialer, *, max_header_bytes: int,
                 idle_timeout: float) -> None:
        self.stream = stream
        self.dialer = dialer
        self.idle_timeout = idle_timeout
        self.max_header_bytes = max_header_bytes
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.flush = _Flush(stream)
        self.upstream: _Upstream | None = None
        self.request_read = False  # the client's EndOfMessage for this request was read

    async def client_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(_as_bytes(await self.stream.receive_some(CHUNK)))
            elif event is h11.PAUSED:  # pipelining before we finished: not supported
                raise h11.RemoteProtocolError("pipelined request while a response is pending",
                                              400)
            else:
                return event  # type: ignore[return-value]

    async def run(self) -> None:
        try:
            while True:
                event: h11.Event | None = None
                with trio.move_on_after(self.idle_timeout):
                    event = await self.client_event()
                if not isinstance(event, h11.Request):
                    return  # idle timeout or the client closed
                if _head_size(event) > self.max_header_bytes:
                    # h11 bounds only heads still incomplete after a read; this bounds all.
                    await self.send_error(431, "request header fields too large (limit "
                                               f"{self.max_header_bytes} bytes)")
                    return
                if event.method == b"CONNECT":
                    await self.connect_tunnel(event)
                    return
                if not await self.forward(event):
                    return
                self.conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            log.info("HTTP proxy: bad request: %s", exc)
            await self.send_error(exc.error_status_hint, f"bad request: {exc}")
        except _STREAM_ERRORS as exc:
            log.debug("HTTP proxy: client connection ended: %s", exc or type(exc).__name__)
        finally:
            await self.drop_upstream()
            await trio.aclose_forcefully(self.stream)

    async def send_error(self, status: int, message: str) -> None:
        """A short text/plain answer that closes the connection (if one can still be sent)."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = message.encode("utf-8", "replace") + b"\n"
        try:
            self.flush.out += self.conn.send(h11.Response(
                status_code=status, reason=_reason(status), headers=[
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]))
            self.flush.out += self.conn.send(h11.Data(data=body))
            self.flush.out += self.conn.send(h11.EndOfMessage())
            await self.flush()
        except (h11.LocalProtocolError, *_STREAM_ERRORS) as exc:
            log.debug("HTTP proxy: could not send %d: %s", status, exc)

    async def drop_upstream(self) -> None:
        if self.upstream is not None:
            await trio.aclose_forcefully(self.upstream.stream)
            self.upstream = None

    async def get_upstream(self, host: str, port: int) -> _Upstream:
        key = (host.lower(), port)
        if self.upstream is not None and self.upstream.key == key:
            return self.upstream
        await self.drop_upstream()
        self.upstream = _Upstream(key, await self.dialer.dial(host, port))
        return self.upstream

    async def connect_tunnel(self, request: h11.Request) -> None:
        try:
            host, port = parse_authority(request.target)
        except BadRequest as exc:
            await self.send_error(400, str(exc))
            return
        with trio.move_on_after(self.idle_timeout) as slow:
            while not isinstance(await self.client_event(), h11.EndOfMessage):
                pass  # a CONNECT body is meaningless; skip it (bounded in time)
        if slow.cancelled_caught:
            return
        try:
            upstream = await self.dialer.dial(host, port)
        except DialError as exc:
            log.info("HTTP proxy: CONNECT %s: %s", format_host_port(host, port), exc.reason)
            await self.send_error(502, str(exc))
            return
        await self.drop_upstream()
        self.flush.out += self.conn.send(h11.Response(
            status_code=200, headers=[], reason=b"Connection established"))
        await self.flush()
        early, _closed = self.conn.trailing_data
        log.debug("HTTP proxy: CONNECT %s", format_host_port(host, port))
        await splice(self.stream, upstream, a_to_b_first=bytes(early))

    async def forward(self, request: h11.Request) -> bool:
        """Proxy one request/response; True when the client connection may go on."""
        try:
            host, port, authority, path = parse_absolute_uri(request.target)
        except BadRequest as exc:
            await self.send_error(400, str(exc))
            return False
        headers = [(b"host", authority.encode("ascii", "replace")),
                   *end_to_end_headers(request.headers, drop=frozenset({b"host"}))]
        outgoing = h11.Request(method=request.method, target=path, headers=headers)
        self.request_read = False
        has_body = _has_body(headers)
        for _attempt in range(2):
            try:
                upstream = await self.get_upstream(host, port)
            except DialError as exc:
                log.info("HTTP proxy: %s %s: %s", request.method.decode("ascii", "replace"),
                         format_host_port(host, port), exc.reason)
                await self.send_error(502, str(exc))
                return False
            reused, upstream.used = upstream.used, True
            ex = await self.exchange(upstream, outgoing, has_body)
            if (ex.upstream_error is not None and reused and not has_body
                    and not ex.response_started and ex.client_error is None):
                await self.drop_upstream()  # a kept-alive connection the server had closed
                continue
            break
        if ex.client_error is not None:
            if isinstance(ex.client_error, h11.RemoteProtocolError):
                raise ex.client_error
            return False
        if ex.upstream_error is not None:
            await self.drop_upstream()
            if not ex.response_started:
                await self.send_error(502, f"{format_host_port(host, port)} failed: "
                                           f"{ex.upstream_error or 'connection closed'}")
            return False
        if not upstream.reusable():
            await self.drop_upstream()
        return ex.body_done and self.conn.our_state is h11.DONE \
            and self.conn.their_state is h11.DONE

    async def exchange(self, upstream: _Upstream, request: h11.Request,
                       has_body: bool) -> _Exchange:
        ex = _Exchange()
        if not has_body:
            # Fast path (most requests): no body pump task, head and end in one write.
            if not self.request_read:
                event = self.conn.next_event()
                if not isinstance(event, h11.EndOfMessage):
                    raise h11.RemoteProtocolError("request body without framing", 400)
                self.request_read = True
            try:
                await upstream.stream.send_all(
                    upstream.conn.send(request) + upstream.conn.send(h11.EndOfMessage()))
            except _STREAM_ERRORS as exc:
                ex.upstream_error = exc
                return ex
            ex.body_done = True
            await self.pump_response(upstream, ex)
            return ex
        try:
            await upstream.stream.send_all(upstream.conn.send(request))
        except _STREAM_ERRORS as exc:
            ex.upstream_error = exc
            return ex
        body_finished = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pump_request_body, upstream, ex, body_finished,
                               nursery.cancel_scope)
            await self.pump_response(upstream, ex)
            if ex.response_done and self.request_read:
                # The whole request was read: at most its last bytes are on their way up.
                with trio.move_on_after(5):
                    await body_finished.wait()
            nursery.cancel_scope.cancel()
        return ex

    async def pump_request_body(self, upstream: _Upstream, ex: _Exchange,
                                finished: trio.Event, scope: trio.CancelScope) -> None:
        try:
            while True:
                event = (h11.EndOfMessage() if self.request_read
                         else await self.client_event())
                if isinstance(event, h11.Data):
                    parts = upstream.conn.send_with_data_passthrough(h11.Data(data=event.data))
                    data = b"".join(parts or ())
                elif isinstance(event, h11.EndOfMessage):
                    self.request_read = True
                    data = upstream.conn.send(h11.EndOfMessage())
                else:
                    raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)
                if data:
                    try:
                        await upstream.stream.send_all(data)
                    except _STREAM_ERRORS as exc:
                        ex.upstream_error = exc  # the response pump reports it
                        return
                if isinstance(event, h11.EndOfMessage):
                    ex.body_done = True
                    return
        except (h11.RemoteProtocolError, *_STREAM_ERRORS) as exc:
            ex.client_error = exc
            scope.cancel()
        finally:
            finished.set()

    async def pump_response(self, upstream: _Upstream, ex: _Exchange) -> None:
        try:
            while True:
                try:
                    event = await upstream.next_event(self.flush)
                except (h11.RemoteProtocolError, *_STREAM_ERRORS) as exc:
                    ex.upstream_error = exc
                    return
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code != 101:
                        self.flush.out += self.conn.send(h11.InformationalResponse(
                            status_code=event.status_code, reason=event.reason,
                            headers=end_to_end_headers(event.headers)))
                elif isinstance(event, h11.Response):
                    ex.response_started = True
                    self.flush.out += self.conn.send(h11.Response(
                        status_code=event.status_code, reason=event.reason,
                        headers=end_to_end_headers(event.headers)))
                elif isinstance(event, h11.Data):
                    parts = self.conn.send_with_data_passthrough(h11.Data(data=event.data)) or []
                    if len(event.data) < _COPY_LIMIT:
                        for part in parts:
                            self.flush.out += part
                    else:  # bulk: written through, not copied into the buffer
                        await self.flush()
                        for part in parts:
                            await self.stream.send_all(part)
                elif isinstance(event, h11.EndOfMessage):
                    self.flush.out += self.conn.send(h11.EndOfMessage())
                    await self.flush()
                    ex.response_done = True
                    return
                else:  # ConnectionClosed before a response
                    ex.upstream_error = ConnectionError("closed without a response")
                    return
        except (h11.LocalProtocolError, *_STREAM_ERRORS) as exc:
            ex.client_error = exc


async def handle_http_proxy_connection(stream: trio.abc.Stream, dialer: Dialer, *,
                                       max_header_bytes: int = 32 * 1024,
                                       idle_timeout: float = 120.0) -> None:
    """Serve one client connection (keep-alive requests, or one CONNECT tunnel)."""
    await _ProxyConnection(stream, dialer, max_header_bytes=max_header_bytes,
                           idle_timeout=idle_timeout).run()


async def serve_http_proxy(listener: trio.abc.Listener[trio.abc.Stream], dialer: Dialer, *,
                           max_header_bytes: int = 32 * 1024,
                           idle_timeout: float = 120.0) -> NoReturn:
    """Serve the HTTP proxy on `listener` (an OS listener on `http.listen`) forever.

    `dialer` decides stack or OS per destination. A client idle for `idle_timeout`
    seconds between requests is disconnected.
    """
    async def handler(stream: trio.abc.Stream) -> None:
        try:
            await handle_http_proxy_connection(stream, dialer, max_header_bytes=max_header_bytes,
                                               idle_timeout=idle_timeout)
        except Exception:
            log.exception("HTTP proxy: connection handler failed")

    await trio.serve_listeners(handler, [listener])


async def start_http_proxy(args: ConfigureArgs, stack: Any, link: Any,
                       nursery: trio.Nursery) -> None:
    """Data-plane hook: listen on `http.listen` (an OS address) and serve there; the
    destinations are dialled by the data plane's shared `Dialer`."""
    if not args.http_listen:
        return
    host, port = parse_listen(args.http_listen, "http.listen")
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(exc.errno, f"http.listen {args.http_listen}: cannot listen: "
                      f"{exc.strerror or exc}; choose a free address in the manifest") from exc
    dialer = shared_dialer(args, stack, link)
    for listener in listeners:
        nursery.start_soon(serve_http_proxy, listener, dialer)
    log.info("HTTP proxy: listening on %s", args.http_listen)
