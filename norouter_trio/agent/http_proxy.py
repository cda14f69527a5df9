"""HTTP proxy on `http.listen`: absolute-URI requests and CONNECT tunnels.

Each destination is dialled through `Dialer` (stack for the virtual network, OS for the
rest). Only heads are parsed (strictly: a bad request is a 400, not guessed at); bodies
are passed through as raw bytes in large reads, never re-encoded or buffered whole. The
parser tracks only what it must to find where a message ends (Content-Length, chunked
sizes, or the end of the stream), so a request costs two small head parses and the
copies. One upstream connection is kept per client connection and reused while the
client keeps asking the same host:port.

What is rewritten: the request line (origin-form target, HTTP/1.1), `Host:` (the URI's
authority wins) and the hop-by-hop headers (those of RFC 9110 §7.6.1 and those named in
`Connection:`), both ways. A response whose body ends at EOF is re-framed as chunked for
an HTTP/1.1 client (so its connection survives); an HTTP/1.0 client gets chunked bodies
decoded and the connection closed after each response.

Errors a client sees: 400 (malformed request, not an absolute http:// URI), 431 (request
head larger than `max_header_bytes`), 501 (a transfer coding other than chunked), 502
(destination unreachable or its answer malformed, with the reason). After an error the
connection is closed; the proxy keeps serving everyone else.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import NoReturn
from urllib.parse import urlsplit

import trio

from norouter_trio.agent.dialer import (
    Dialer,
    DialError,
    format_host_port,
    receiver,
    sender,
    serve_streams,
    splice,
)

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
UPSTREAM_MAX_HEADERS = 256 * 1024
_MAX_CHUNK_LINE = 4096  # a chunk-size line or a trailer line longer than this is refused
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"upgrade",
})
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/1\.([0-9])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?: ([^\x00\r\n]*))?")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00\r\n]*?)[ \t]*")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

Headers = list[tuple[bytes, bytes]]


class BadRequest(Exception):
    """The request cannot be proxied; the message goes into the 400 body."""


class _HTTPError(Exception):
    """Answer the client with `status` and close (`str()` goes into the body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UpstreamFailed(Exception):
    """The upstream broke, closed or answered garbage; `started`: the client has had
    part of the response already (so no 502 can be sent any more)."""

    def __init__(self, reason: str, *, started: bool, idle: bool = False) -> None:
        super().__init__(reason)
        self.started = started
        self.idle = idle  # closed before sending a single byte (a stale kept-alive one)


_SIMPLE_URI = re.compile(rb"[hH][tT][tT][pP]://([-A-Za-z0-9._~]+)(?::([0-9]{1,5}))?"
                         rb"(/[^?#]*(?:\?[^#]+)?)?")


def parse_absolute_uri(target: bytes) -> tuple[str, int, str, bytes]:
    """`http://host[:port]/path?q` -> (host, port, authority for Host:, origin-form target)."""
    m = _SIMPLE_URI.fullmatch(target)
    if m is not None and (m[2] is None or 0 < int(m[2]) < 65536):
        # The usual form, without urlsplit's cost; anything else takes the general path.
        authority = m[1] + b":" + m[2] if m[2] is not None else m[1]
        return (m[1].decode("ascii").lower(), int(m[2] or 80), authority.decode("ascii"),
                m[3] or b"/")
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


def parse_headers(lines: list[bytes]) -> Headers:
    """Header lines -> (name as received, value); obsolete line folding is unfolded.
    ValueError names the first bad line."""
    headers: Headers = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and headers:  # obs-fold (RFC 9112 §5.2)
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip(b" \t"))
            continue
        m = _HEADER_LINE.fullmatch(line)
        if m is None:
            raise ValueError(f"malformed header line {line[:60]!r}")
        headers.append((m[1], m[2]))
    return headers


def hop_by_hop(headers: Headers) -> tuple[frozenset[bytes], bool]:
    """(lower-case names not to forward, whether `Connection:` says close)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return _HOP_BY_HOP | named, b"close" in named


def body_framing(headers: Headers, *, strict: bool = True) -> tuple[bool, int | None, bool]:
    """(chunked, content length, other transfer coding) of a message; ValueError when
    Content-Length is malformed or conflicting, or (`strict`, for requests: a smuggling
    risk) given beside Transfer-Encoding. Otherwise Transfer-Encoding wins (length None)."""
    codings: list[bytes] = []
    length: int | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",") if c.strip()]
        elif lower == b"content-length":
            for item in value.split(b","):
                item = item.strip()
                if not item.isdigit() or len(item) > 18:
                    raise ValueError(f"bad Content-Length {value[:40]!r}")
                if length is not None and int(item) != length:
                    raise ValueError("conflicting Content-Length values")
                length = int(item)
    if codings:
        if length is not None and strict:
            raise ValueError("both Content-Length and Transfer-Encoding")
        return codings[-1] == b"chunked", None, codings != [b"chunked"]
    return False, length, False


class ChunkedScanner:
    """Finds where a chunked body ends (RFC 9112 §7.1) without copying chunk data;
    with `decode` it also hands out the data (for an HTTP/1.0 client)."""

    __slots__ = ("_left", "_partial", "_state")
    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._left = 0
        self._partial = b""

    def feed(self, data: bytes | bytearray, start: int = 0,
             decode: list[bytes] | None = None) -> int:
        """Scan `data[start:]`: the offset just past the body's end, or -1 when the body
        goes on. ValueError for a malformed chunk."""
        i, n = start, len(data)
        while i < n:
            if self._state == self._DATA:
                take = min(self._left, n - i)
                if decode is not None:
                    decode.append(bytes(data[i:i + take]))
                i += take
                self._left -= take
                if not self._left:
                    self._state = self._DATA_END
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._partial += data[i:]
                if len(self._partial) > _MAX_CHUNK_LINE:
                    raise ValueError("chunk line too long")
                return -1
            line = (self._partial + data[i:j]) if self._partial else bytes(data[i:j])
            self._partial = b""
            i = j + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > _MAX_CHUNK_LINE:
                raise ValueError("chunk line too long")
            if self._state == self._DATA_END:
                if line:
                    raise ValueError("no CRLF after chunk data")
                self._state = self._SIZE
            elif self._state == self._SIZE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if _HEX.fullmatch(size) is None:
                    raise ValueError(f"bad chunk size {line[:20]!r}")
                self._left = int(size, 16)
                self._state = self._DATA if self._left else self._TRAILER
            elif not line:  # the empty line after the trailers
                self._state = self._SIZE
                return i
        return -1


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _chunk(data: bytes | bytearray) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


class _Upstream:
    """One upstream connection and what was read from it beyond the last message."""

    __slots__ = ("buf", "key", "stream", "used")

    def __init__(self, key: tuple[str, int], stream: trio.abc.Stream) -> None:
        self.key = key
        self.stream = stream
        self.buf = bytearray()
        self.used = False


class _Request:
    __slots__ = (
        "chunked",
        "close",
        "headers",
        "http11",
        "length",
        "method",
        "skip",
        "target",
    )

    def __init__(self, head: bytes) -> None:
        lines = _LINE_END.split(head)
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            raise _HTTPError(400, f"bad request line {lines[0][:80]!r}")
        self.method, self.target = m[1], m[2]
        self.http11 = m[3] != b"0"
        try:
            self.headers = parse_headers([line for line in lines[1:] if line])
            self.chunked, self.length, other = body_framing(self.headers)
        except ValueError as exc:
            raise _HTTPError(400, str(exc)) from None
        if other:
            raise _HTTPError(501, "only Transfer-Encoding: chunked is supported")
        if self.http11 and not any(n.lower() == b"host" for n, _ in self.headers):
            raise _HTTPError(400, "HTTP/1.1 request without Host:")
        self.skip, self.close = hop_by_hop(self.headers)
        if not self.http11:
            self.close = True  # no HTTP/1.0 keep-alive here

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


class _ProxyConnection:
    def __init__(self, stream: trio.abc.Stream, dialer: Dialer, *, max_header_bytes: int,
                 idle_timeout: float) -> None:
        self.stream = stream
        # The client's socket read and written on its descriptor: no scheduling pass
        # after each call (the upstream side, a stack stream, yields anyway).
        self.receive = receiver(stream)
        self.send = sender(stream)
        self.dialer = dialer
        self.idle_timeout = idle_timeout
        self.max_header_bytes = max_header_bytes
        self.buf = bytearray()  # read from the client, not consumed yet
        self.upstream: _Upstream | None = None
        self.answered = False  # the client has had (part of) a response to this request
        self.body_read = False  # the whole request body has been read from the client
        self.spliced = False

    async def run(self) -> None:
        # One scope for the connection, armed only while waiting for a request (cheaper
        # than a new scope per request); when it fires the connection just closes.
        idle = trio.CancelScope(deadline=trio.current_time() + self.idle_timeout)
        try:
            with idle:
                await self.serve(idle)
        except _HTTPError as exc:
            log.info("HTTP proxy: bad request: %s", exc)
            await self.send_error(exc.status, f"bad request: {exc}")
        except _STREAM_ERRORS as exc:
            log.debug("HTTP proxy: client connection ended: %s", exc or type(exc).__name__)
        finally:
            await self.drop_upstream()
            if not self.spliced:
                await trio.aclose_forcefully(self.stream)

    async def serve(self, idle: trio.CancelScope) -> None:
        while True:  # `idle` is armed on entry and again after each request
            self.answered = False
            head = await self.read_request_head()
            idle.deadline = math.inf
            if head is None:
                return  # the client closed
            request = _Request(head)
            if request.method == b"CONNECT":
                await self.connect_tunnel(request)
                return
            if not await self.forward(request):
                return
            idle.deadline = trio.current_time() + self.idle_timeout

    async def read_request_head(self) -> bytes | None:
        """The next request head (without the blank line); None when the client closed."""
        buf, limit = self.buf, self.max_header_bytes
        scanned = 0
        while True:
            while buf and buf[0] in b"\r\n":
                del buf[:1]  # empty lines before a request are ignored (RFC 9112 §2.2)
            m = _HEAD_END.search(buf, max(0, scanned - 3))
            if m is not None:
                if m.start() > limit:
                    break
                head = bytes(buf[:m.start()])
                del buf[:m.end()]
                return head
            if len(buf) > limit:
                break
            scanned = len(buf)
            data = await self.receive(CHUNK)
            if not data:
                if buf:
                    raise _HTTPError(400, "the request head was cut short")
                return None
            buf += data
        raise _HTTPError(431, f"request header fields too large (limit {limit} bytes)")

    async def send_error(self, status: int, message: str) -> None:
        """A short text/plain answer that closes the connection (if one can still be sent)."""
        if self.answered:
            return
        self.answered = True
        body = message.encode("utf-8", "replace") + b"\n"
        try:
            with trio.move_on_after(5):
                await self.send(
                    b"HTTP/1.1 %d %b\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%b"
                    % (status, _reason(status), len(body), body))
        except _STREAM_ERRORS as exc:
            log.debug("HTTP proxy: could not send %d: %s", status, exc)

    async def drop_upstream(self) -> None:
        if self.upstream is not None:
            await trio.aclose_forcefully(self.upstream.stream)
            self.upstream = None

    async def get_upstream(self, host: str, port: int, head: bytes) -> tuple[_Upstream, bool]:
        """The upstream for host:port, kept or dialled; True when it is new and `head`
        went with the dial (through the stack: on the handshake's ACK)."""
        key = (host.lower(), port)
        if self.upstream is not None and self.upstream.key == key:
            return self.upstream, False
        await self.drop_upstream()
        self.upstream = _Upstream(key, await self.dialer.dial(host, port, initial_data=head))
        return self.upstream, True

    async def connect_tunnel(self, request: _Request) -> None:
        try:
            host, port = parse_authority(request.target)
        except BadRequest as exc:
            await self.send_error(400, str(exc))
            return
        if request.has_body:  # meaningless for CONNECT: skip it (bounded in time)
            with trio.move_on_after(self.idle_timeout) as slow:
                await self.skip_body(request)
            if slow.cancelled_caught:
                return
        early = bytes(self.buf)  # the client did not wait for our answer: pass it on
        self.buf.clear()
        try:
            upstream = await self.dialer.dial(host, port, initial_data=early)
        except DialError as exc:
            log.info("HTTP proxy: CONNECT %s: %s", format_host_port(host, port), exc.reason)
            await self.send_error(502, str(exc))
            return
        await self.drop_upstream()
        self.answered = True
        try:
            await self.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        except _STREAM_ERRORS:
            await trio.aclose_forcefully(upstream)
            raise
        log.debug("HTTP proxy: CONNECT %s:%d", host, port)
        self.spliced = True  # splice closes both streams
        await splice(self.stream, upstream)

    async def skip_body(self, request: _Request) -> None:
        async def discard(data: bytes) -> None:
            pass
        await self.pump_request_body(request, discard)

    async def forward(self, request: _Request) -> bool:
        """Proxy one request/response; True when the client connection may go on."""
        try:
            host, port, authority, path = parse_absolute_uri(request.target)
        except BadRequest as exc:
            await self.send_error(400, str(exc))
            return False
        skip = request.skip | {b"host"}
        head = b"".join([request.method, b" ", path, b" HTTP/1.1\r\nHost: ",
                         authority.encode("ascii", "replace"), b"\r\n",
                         *[b"%b: %b\r\n" % (n, v) for n, v in request.headers
                           if n.lower() not in skip], b"\r\n"])
        is_head = request.method == b"HEAD"
        for attempt in range(2):
            try:
                upstream, sent = await self.get_upstream(host, port, head)
            except DialError as exc:
                log.info("HTTP proxy: %s %s: %s", request.method.decode("ascii", "replace"),
                         format_host_port(host, port), exc.reason)
                await self.send_error(502, str(exc))
                return False
            reused, upstream.used = upstream.used, True
            try:
                if request.has_body:
                    client_ok, upstream_ok = await self.exchange_with_body(
                        upstream, request, b"" if sent else head, is_head)
                else:
                    try:
                        if not sent:
                            await upstream.stream.send_all(head)
                    except _STREAM_ERRORS as exc:
                        raise _UpstreamFailed(str(exc) or "connection closed", started=False,
                                              idle=True) from None
                    client_ok, upstream_ok = await self.relay_response(
                        upstream, is_head, request)
            except _UpstreamFailed as exc:
                await self.drop_upstream()
                if exc.started:
                    return False
                if exc.idle and reused and attempt == 0 and not request.has_body:
                    continue  # a kept-alive connection the server had closed: once more
                await self.send_error(502, f"{format_host_port(host, port)} failed: {exc}")
                return False
            if not upstream_ok:
                await self.drop_upstream()
            return client_ok
        return False  # not reached: the second attempt returns

    async def pump_request_body(self, request: _Request,
                                send: Callable[[bytes], Awaitable[None]]) -> None:
        """Pass the request body to `send` as it arrives (raw, chunk framing kept); what
        follows it stays in `self.buf` (a pipelined request)."""
        buf = self.buf
        self.body_read = False
        if request.chunked:
            scanner = ChunkedScanner()
            while True:
                try:
                    end = scanner.feed(buf)
                except ValueError as exc:
                    raise _HTTPError(400, f"bad chunked request body: {exc}") from None
                if end >= 0:
                    data = bytes(buf[:end])
                    del buf[:end]
                    self.body_read = True
                    await send(data)
                    return
                if buf:
                    data = bytes(buf)
                    buf.clear()
                    await send(data)
                more = await self.receive(CHUNK)
                if not more:
                    raise trio.BrokenResourceError("client closed in the request body")
                buf += more
        left = request.length or 0
        while left:
            if not buf:
                more = await self.receive(CHUNK)
                if not more:
                    raise trio.BrokenResourceError(f"client closed with {left} body bytes "
                                                   "to go")
                buf += more
            take = min(left, len(buf))
            data = bytes(buf[:take])
            del buf[:take]
            left -= take
            self.body_read = not left
            await send(data)
        self.body_read = True

    async def exchange_with_body(self, upstream: _Upstream, request: _Request, head: bytes,
                                 is_head: bool) -> tuple[bool, bool]:
        """Stream the body up while the response comes back (a server may answer early);
        `head` is empty when it went with the dial."""
        try:
            if head:
                await upstream.stream.send_all(head)
        except _STREAM_ERRORS as exc:
            raise _UpstreamFailed(str(exc) or "connection closed", started=False) from None
        body_done = trio.Event()
        up_error: list[BaseException] = []
        client_error: list[BaseException] = []

        async def send_up(data: bytes) -> None:
            if not up_error:
                try:
                    await upstream.stream.send_all(data)
                except _STREAM_ERRORS as exc:
                    up_error.append(exc)  # the response side reports it (or has its answer)

        async def body(scope: trio.CancelScope) -> None:
            try:
                await self.pump_request_body(request, send_up)
            except (_HTTPError, *_STREAM_ERRORS) as exc:
                client_error.append(exc)
                scope.cancel()
                return
            body_done.set()

        result = (False, False)
        failed: _UpstreamFailed | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(body, nursery.cancel_scope)
            try:
                result = await self.relay_response(upstream, is_head, request)
            except _UpstreamFailed as exc:  # raised below: not wrapped in a group
                failed = exc
            if failed is None and self.body_read and not body_done.is_set():
                # The whole request was read: at most its last bytes are on their way up.
                with trio.move_on_after(5):
                    await body_done.wait()
            nursery.cancel_scope.cancel()
        if failed is not None and not client_error:
            raise failed
        if not body_done.is_set():
            # The answer came before the whole body: the rest cannot be told apart from a
            # next request, so this client connection ends after the answer.
            result = (False, False)
        if client_error:
            error = client_error[0]
            if isinstance(error, _HTTPError) and not self.answered:
                raise error
            return False, False
        if up_error:
            return result[0], False
        return result

    async def read_upstream_head(self, upstream: _Upstream) -> bytes:
        buf = upstream.buf
        scanned = 0
        while True:
            m = _HEAD_END.search(buf, max(0, scanned - 3))
            if m is not None:
                head = bytes(buf[:m.start()])
                del buf[:m.end()]
                return head
            if len(buf) > UPSTREAM_MAX_HEADERS:
                raise _UpstreamFailed(f"response head larger than {UPSTREAM_MAX_HEADERS} "
                                      "bytes", started=self.answered)
            scanned = len(buf)
            try:
                data = await upstream.stream.receive_some(CHUNK)
            except _STREAM_ERRORS as exc:
                raise _UpstreamFailed(str(exc) or "connection broken", started=self.answered,
                                      idle=not buf) from None
            if not data:
                raise _UpstreamFailed("closed without a response", started=self.answered,
                                      idle=not buf)
            buf += data

    async def relay_response(self, upstream: _Upstream, is_head: bool,
                             request: _Request) -> tuple[bool, bool]:
        """Pass one response on; (client connection may go on, upstream reusable)."""
        while True:
            head = await self.read_upstream_head(upstream)
            lines = _LINE_END.split(head)
            m = _STATUS_LINE.fullmatch(lines[0])
            try:
                if m is None:
                    raise ValueError(f"bad status line {lines[0][:80]!r}")
                headers = parse_headers(lines[1:])
                chunked, length, other = body_framing(headers, strict=False)
            except ValueError as exc:
                raise _UpstreamFailed(f"bad response: {exc}", started=self.answered) from None
            status = int(m[2])
            skip, up_close = hop_by_hop(headers)
            if chunked or other:
                skip |= {b"content-length"}  # Transfer-Encoding wins (RFC 9112 §6.3)
            if status >= 200:
                break
            if status != 101 and request.http11:  # 100 Continue and friends
                self.answered = True
                await self.send(b"".join([
                    b"HTTP/1.1 ", m[2], b" ", m[3] or b"", b"\r\n",
                    *[b"%b: %b\r\n" % (n, v) for n, v in headers if n.lower() not in skip],
                    b"\r\n"]))
        up_keep = m[1] != b"0" and not up_close
        keep = not request.close
        out = [b"HTTP/1.1 ", m[2], b" ", m[3] or b"", b"\r\n"]
        if request.http11:
            # Raw framing passes through; a body up to EOF is re-chunked.
            until_eof = not (is_head or status in (204, 304) or chunked
                             or length is not None)
            if until_eof and other:
                keep = False  # a coding we cannot re-chunk: pass it and close
            mode = "none" if is_head or status in (204, 304) else (
                "chunked" if chunked else "length" if length is not None
                else "rechunk" if keep else "eof")
        else:
            mode = "none" if is_head or status in (204, 304) else (
                "dechunk" if chunked else "length" if length is not None else "eof")
            if mode == "dechunk":
                skip = skip | {b"transfer-encoding"}
        out += [b"%b: %b\r\n" % (n, v) for n, v in headers if n.lower() not in skip]
        if mode == "rechunk":
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not keep:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        self.answered = True
        up_ok = await self.relay_body(upstream, mode, length or 0, b"".join(out))
        return keep, up_keep and up_ok

    async def relay_body(self, upstream: _Upstream, mode: str, length: int,
                         head: bytes) -> bool:
        """Send `head` and the body; True when the upstream ended the message cleanly
        with nothing extra (it may be reused)."""
        buf, send = upstream.buf, self.send
        receive = upstream.stream.receive_some

        async def more() -> bytes | bytearray:
            try:
                return await receive(CHUNK)
            except _STREAM_ERRORS as exc:
                raise _UpstreamFailed(str(exc) or "connection broken", started=True) from None

        if mode == "none":
            await send(head)
            return not buf
        if mode == "length":
            take = min(length, len(buf))
            await send(head + buf[:take] if take else head)
            del buf[:take]
            left = length - take
            while left:
                data = await more()
                if not data:
                    raise _UpstreamFailed(f"closed with {left} body bytes to go", started=True)
                if len(data) > left:
                    buf += data[left:]
                    data = data[:left]
                left -= len(data)
                await send(data)
            return not buf
        if mode in ("chunked", "dechunk"):
            scanner = ChunkedScanner()
            pieces: list[bytes] | None = [] if mode == "dechunk" else None
            first = head
            while True:
                try:
                    end = scanner.feed(buf, decode=pieces)
                except ValueError as exc:
                    raise _UpstreamFailed(f"bad chunked body: {exc}", started=True) from None
                upto = len(buf) if end < 0 else end
                if pieces is not None:
                    data = b"".join(pieces)
                    pieces.clear()
                else:
                    data = bytes(buf[:upto])
                del buf[:upto]
                if first or data:
                    await send(first + data if first else data)
                    first = b""
                if end >= 0:
                    return not buf
                data = await more()
                if not data:
                    raise _UpstreamFailed("closed in a chunked body", started=True)
                buf += data
        # until EOF: as it is ("eof"), or each piece as a chunk ("rechunk")
        rechunk = mode == "rechunk"
        data = bytes(buf)
        buf.clear()
        await send(head + (_chunk(data) if rechunk and data else data))
        while True:
            data = await more()
            if not data:
                break
            await send(_chunk(data) if rechunk else data)
        if rechunk:
            await send(b"0\r\n\r\n")
        return False


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
            await trio.aclose_forcefully(stream)

    await serve_streams(listener, handler, "HTTP proxy")
