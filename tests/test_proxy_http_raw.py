"""The HTTP proxy's raw pass-through: framing found without re-encoding, pipelining,
HTTP/1.0 clients, 1xx, early answers, stale kept-alive upstreams and broken origins.

Origins here are scripted trio servers on 127.0.0.1 (reached through the OS side of the
dialer), so each test controls the exact bytes the proxy gets.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dialer import TIMEOUT, FakeStack, OSDialer, make_dialer
from test_http_proxy import http_proxy, raw_exchange

from norouter_trio.agent.http_proxy import ChunkedScanner, parse_absolute_uri

Script = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def read_head(stream: trio.abc.ReceiveStream, buf: bytearray) -> bytes:
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(f"closed before a head; got {bytes(buf)!r}")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


@asynccontextmanager
async def origin(script: Script, *, keep_alive: bool = True) -> AsyncIterator[list[int]]:
    """A server on 127.0.0.1 running `script(stream, request_head)` for each request;
    yields [port, connections so far]."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    state = [listener.socket.getsockname()[1], 0]

    async def handle(stream: trio.SocketStream) -> None:
        state[1] += 1
        buf = bytearray()
        async with stream:
            try:
                while True:
                    head = await read_head(stream, buf)
                    await script(stream, head)
                    if not keep_alive:
                        return
            except (EOFError, trio.BrokenResourceError):
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        yield state
        nursery.cancel_scope.cancel()


async def echo_path(stream: trio.SocketStream, head: bytes) -> None:
    path = head.split(b" ", 2)[1]
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                          % (len(path), path))


# --- the chunked scanner -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=5),
       ext=st.booleans(), trailers=st.lists(st.sampled_from([b"X-A: 1", b"X-Bb: two"]),
                                            max_size=2),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_chunked_scanner_finds_the_end_however_it_is_cut(
        chunks: list[bytes], ext: bool, trailers: list[bytes], cuts: list[int]) -> None:
    body = b"".join(b"%x%b\r\n%b\r\n" % (len(c), b";x=y" if ext else b"", c) for c in chunks)
    body += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    wire = body + b"GET /next"
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    scanner, end, offset = ChunkedScanner(), -1, 0
    decoded: list[bytes] = []
    for a, b in itertools.pairwise(points):
        piece = wire[a:b]
        found = scanner.feed(piece, decode=decoded)
        if found >= 0:
            end = offset + found
            break
        offset += len(piece)
    assert end == len(body)
    assert b"".join(decoded) == b"".join(chunks)


@pytest.mark.parametrize("wire", [b"zz\r\n", b"5\r\nabcdeXX\r\n", b"1" * 5000,
                                  b"-1\r\n"])
def test_chunked_scanner_refuses_malformed_bodies(wire: bytes) -> None:
    with pytest.raises(ValueError):
        ChunkedScanner().feed(wire)


# --- the proxy -----------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with origin(echo_path) as (port, *_), http_proxy(
            make_dialer(FakeStack(), OSDialer())) as proxy:
        answer = await raw_exchange(proxy, (
            f"GET http://127.0.0.1:{port}/first HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET http://127.0.0.1:{port}/second HTTP/1.1\r\nHost: x\r\n"
            "Connection: close\r\n\r\n").encode())
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert answer.index(b"/first") < answer.index(b"/second")
    assert answer.lower().count(b"connection: close") == 1  # only on the last answer


async def test_http10_client_gets_a_chunked_body_decoded() -> None:
    async def chunked(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n")

    async with origin(chunked) as (port, *_), http_proxy(
            make_dialer(FakeStack(), OSDialer())) as proxy:
        answer = await raw_exchange(
            proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.0\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert body == b"hello world"
        assert b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        # An HTTP/1.1 client gets the same bytes the origin sent, chunks and trailer.
        answer = await raw_exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n"
                                           "Host: x\r\nConnection: close\r\n\r\n".encode())
        assert answer.endswith(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n")


async def test_a_stale_kept_alive_upstream_is_dialled_again() -> None:
    """The origin claims keep-alive but closes after each answer: the next request on the
    client's connection is retried once on a new upstream connection."""
    async with origin(echo_path, keep_alive=False) as state, http_proxy(
            make_dialer(FakeStack(), OSDialer())) as proxy:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", int(proxy.rsplit(":", 1)[1]))
            async with stream:
                buf = bytearray()
                for path in (b"/one", b"/two", b"/three"):
                    await stream.send_all(b"GET http://127.0.0.1:%d%b HTTP/1.1\r\n"
                                          b"Host: x\r\n\r\n" % (state[0], path))
                    assert (await read_head(stream, buf)).startswith(b"HTTP/1.1 200 ")
                    while len(buf) < len(path):
                        buf += await stream.receive_some(65536)
                    assert bytes(buf) == path
                    buf.clear()
    assert state[1] == 3


async def test_an_early_answer_ends_the_client_connection() -> None:
    """The origin refuses a big upload before reading it: the client gets the answer and
    its connection is closed (the unread body cannot be told from a next request)."""
    async def refuse(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n"
                              b"\r\nnope")

    async with origin(refuse) as (port, *_), http_proxy(
            make_dialer(FakeStack(), OSDialer())) as proxy:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", int(proxy.rsplit(":", 1)[1]))
            async with stream:
                await stream.send_all(f"POST http://127.0.0.1:{port}/u HTTP/1.1\r\nHost: x"
                                      "\r\nContent-Length: 10000000\r\n\r\n".encode()
                                      + b"x" * 1000)
                got = b""
                while chunk := await stream.receive_some(65536):
                    got += chunk
    assert got.startswith(b"HTTP/1.1 413 ") and got.endswith(b"\r\n\r\nnope")


async def test_expect_100_continue_passes_through() -> None:
    async def continue_then_read(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        got = b""
        while len(got) < 5:
            got += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + got)

    async with origin(continue_then_read) as (port, *_), http_proxy(
            make_dialer(FakeStack(), OSDialer())) as proxy:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", int(proxy.rsplit(":", 1)[1]))
            async with stream:
                await stream.send_all(f"PUT http://127.0.0.1:{port}/u HTTP/1.1\r\nHost: x\r\n"
                                      "Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
                                      .encode())
                buf = bytearray()
                assert (await read_head(stream, buf)).startswith(b"HTTP/1.1 100 ")
                await stream.send_all(b"hello")
                assert (await read_head(stream, buf)).startswith(b"HTTP/1.1 200 ")
                while len(buf) < 5:
                    buf += await stream.receive_some(65536)
    assert bytes(buf) == b"hello"


@pytest.mark.parametrize("response", [b"garbage\r\n\r\n",
                                      b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n",
                                      b""], ids=["garbage", "bad-length", "closed"])
async def test_a_broken_origin_answer_is_502(response: bytes) -> None:
    async def broken(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(response)
        await stream.aclose()

    async with origin(broken, keep_alive=False) as (port, *_), http_proxy(
            make_dialer(FakeStack(), OSDialer())) as proxy:
        answer = await raw_exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n"
                                           "Host: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
    assert f"127.0.0.1:{port} failed".encode() in answer


async def test_a_response_cut_short_is_not_completed() -> None:
    """The origin promises 100 bytes and closes after 10: the client sees the 10 and a
    closed connection, never a response that looks whole."""
    async def short(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await stream.aclose()

    async with origin(short, keep_alive=False) as (port, *_), http_proxy(
            make_dialer(FakeStack(), OSDialer())) as proxy:
        answer = await raw_exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n"
                                           "Host: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n0123456789")


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"400"),
    (b"Transfer-Encoding: gzip\r\n", b"501"),
    (b"Content-Length: 3\r\nContent-Length: 4\r\n", b"400"),
], ids=["length-and-chunked", "gzip", "two-lengths"])
async def test_ambiguous_request_framing_is_refused(headers: bytes, status: bytes) -> None:
    stack = FakeStack()
    async with http_proxy(make_dialer(stack, OSDialer())) as proxy:
        answer = await raw_exchange(proxy, b"POST http://web:80/ HTTP/1.1\r\nHost: web\r\n"
                                           + headers + b"\r\nabc")
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
    assert stack.calls == []


@settings(max_examples=50, deadline=None)
@given(scheme=st.sampled_from(["http", "HTTP", "Http"]),
       host=st.from_regex(r"[A-Za-z0-9][-A-Za-z0-9.]{0,20}", fullmatch=True),
       port=st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
       path=st.from_regex(r"(/[-a-zA-Z0-9._~%!$&'()*+,;=:@]*)*", fullmatch=True),
       query=st.one_of(st.none(), st.from_regex(r"[-a-zA-Z0-9=&%/?]*", fullmatch=True)),
       fragment=st.one_of(st.none(), st.from_regex(r"[a-z0-9]*", fullmatch=True)))
def test_uri_fast_path_agrees_with_urlsplit(scheme: str, host: str, port: int | None,
                                            path: str, query: str | None,
                                            fragment: str | None) -> None:
    from urllib.parse import urlsplit

    authority = host if port is None else f"{host}:{port}"
    uri = f"{scheme}://{authority}{path}"
    if query is not None:
        uri += "?" + query
    if fragment is not None:
        uri += "#" + fragment
    parts = urlsplit(uri)
    expected_path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    assert parse_absolute_uri(uri.encode()) == (
        parts.hostname, parts.port or 80, parts.netloc, expected_path.encode())


async def test_an_origin_sending_length_and_chunked_is_read_as_chunked() -> None:
    async def both(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")

    async with origin(both) as (port, *_), http_proxy(
            make_dialer(FakeStack(), OSDialer())) as proxy:
        answer = await raw_exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n"
                                           "Host: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-length" not in head.lower()
    assert body == b"2\r\nok\r\n0\r\n\r\n"


@pytest.mark.parametrize("name", ["l" * 64 + ".test", ("a" * 60 + ".") * 5 + "com",
                                  "a..b"], ids=["long-label", "long-name", "empty-label"])
async def test_names_no_resolver_takes_are_refused_by_the_dialer(name: str) -> None:
    from norouter_trio.agent.dialer import DialError

    os_dialer = OSDialer()
    with pytest.raises(DialError) as info:
        await make_dialer(FakeStack(), os_dialer).dial(name, 80)
    assert info.value.code == "resolve" and "not a valid host name" in str(info.value)
    assert os_dialer.calls == []
