"""The HTTP proxy, driven by curl (absolute URIs, --proxytunnel) and raw sockets, to
"remote" servers through a fake stack and to a server outside through the OS."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from test_dialer import TIMEOUT, FakeStack, OriginServer, OSDialer, make_dialer

from norouter_trio.agent.dialer import Dialer
from norouter_trio.agent.http_proxy import parse_absolute_uri, parse_authority, serve_http_proxy

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@asynccontextmanager
async def http_proxy(dialer: Dialer, **kwargs: object) -> AsyncIterator[str]:
    """serve_http_proxy on 127.0.0.1:PORT; yields the proxy URL."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_http_proxy(listeners[0], dialer, **kwargs))  # type: ignore[arg-type]
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def curl(*args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of curl, without any proxy from the environment."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with trio.fail_after(TIMEOUT + 5):
        out = await trio.run_process(["curl", "-sS", "--max-time", str(TIMEOUT), *args],
                                     capture_stdout=True, capture_stderr=True, check=False,
                                     env=env)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode()


async def raw_exchange(proxy: str, data: bytes) -> bytes:
    """Send `data` to the proxy and read until it closes the connection."""
    port = int(proxy.rsplit(":", 1)[1])
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            out = b""
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out




@pytest.fixture
def stack() -> FakeStack:
    return FakeStack()


@pytest.fixture
def os_dialer() -> OSDialer:
    return OSDialer()


# --- destinations --------------------------------------------------------------------


@pytest.mark.parametrize("tunnel", [False, True], ids=["absolute-uri", "connect"])
async def test_names_aliases_and_vips_through_the_stack(
        web: OriginServer, stack: FakeStack, os_dialer: OSDialer, tunnel: bool) -> None:
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        for host in ("web", "nginx.example.com", "NGINX", "127.0.42.101"):
            extra = ["--proxytunnel"] if tunnel else []
            rc, out, err = await curl("--proxy", proxy, *extra, f"http://{host}:{web.port}/hi")
            assert rc == 0, err
            assert "hello from web" in out and "path /hi" in out
            assert f"host: {host}:{web.port}" in out
            assert "proxy-connection" not in out
    assert stack.calls == [("127.0.42.101", web.port)] * 4
    assert os_dialer.calls == []


@pytest.mark.parametrize("tunnel", [False, True], ids=["absolute-uri", "connect"])
async def test_other_destinations_through_the_os(
        outside: OriginServer, stack: FakeStack, os_dialer: OSDialer, tunnel: bool) -> None:
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        extra = ["--proxytunnel"] if tunnel else []
        rc, out, err = await curl("--proxy", proxy, *extra,
                                  f"http://127.0.0.1:{outside.port}/x?y=1")
    assert rc == 0, err
    assert "hello from outside" in out and "path /x?y=1" in out
    assert stack.calls == [] and os_dialer.calls == [("127.0.0.1", outside.port)]


async def test_keep_alive_reuses_both_connections(web: OriginServer, stack: FakeStack,
                                                  os_dialer: OSDialer) -> None:
    url = f"http://web:{web.port}/"
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        rc, out, err = await curl("--proxy", proxy, "-w", "connects=%{num_connects}\n",
                                  url + "a", url + "b", url + "chunked", "--next",
                                  "--proxy", proxy, "-w", "connects=%{num_connects}\n",
                                  "-I", url + "c")
    assert rc == 0, err
    assert out.count("hello from web") == 2 and "one,two,three" in out
    assert "content-length: " in out.lower()  # the HEAD answer
    assert out.count("connects=1") == 1 and out.count("connects=0") == 3
    assert len(web.connections) == 1          # one upstream connection for all four
    assert stack.calls == [("127.0.42.101", web.port)]


async def test_large_bodies_both_ways(web: OriginServer, stack: FakeStack,
                                      os_dialer: OSDialer, tmp_path: Path) -> None:
    size = 12 * 1024 * 1024 + 7
    payload = os.urandom(size)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    expected = f"{size} {hashlib.sha256(payload).hexdigest()}"
    url = f"http://web:{web.port}"
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        rc, out, err = await curl("--proxy", proxy, "--data-binary", f"@{upload}",
                                  url + "/upload")
        assert rc == 0, err
        assert out.strip() == expected
        rc, out, err = await curl("--proxy", proxy, "-H", "Transfer-Encoding: chunked",
                                  "--data-binary", f"@{upload}", url + "/upload")
        assert rc == 0, err
        assert out.strip() == expected
        download = tmp_path / "download.bin"
        rc, out, err = await curl("--proxy", proxy, "-o", str(download), url + f"/bytes/{size}")
        assert rc == 0, err
    block = bytes(range(256)) * 256
    data = download.read_bytes()
    assert len(data) == size
    assert data == (block * (size // len(block) + 1))[:size]


async def test_responses_are_streamed_not_buffered(web: OriginServer, stack: FakeStack,
                                                   os_dialer: OSDialer) -> None:
    """The first chunk arrives while the origin is still holding back the rest."""
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        port = int(proxy.rsplit(":", 1)[1])
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET http://web:{web.port}/slow HTTP/1.1\r\n"
                                      f"Host: web\r\n\r\n".encode())
                got = b""
                while b"first" not in got:
                    got += await stream.receive_some(65536)
                assert b"second" not in got
                web.httpd.release.set()
                while b"second" not in got:
                    got += await stream.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 200 ")


async def test_close_delimited_response_and_http10_client(
        web: OriginServer, stack: FakeStack, os_dialer: OSDialer) -> None:
    """An origin body that ends at EOF is re-framed for a keep-alive HTTP/1.1 client
    (chunked), and an HTTP/1.0 client gets it and a closed connection."""
    url = f"http://web:{web.port}"
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        rc, out, err = await curl("--proxy", proxy, "-D", "-", url + "/eof-body",
                                  url + "/again")
        assert rc == 0, err
        assert out.count("until-eof") == 1000 and "hello from web" in out
        assert "transfer-encoding: chunked" in out.lower()
        answer = await raw_exchange(proxy, f"GET {url}/eof-body HTTP/1.0\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"until-eof") == 1000
    assert len(web.connections) == 3  # the origin closed after each /eof-body


# --- errors --------------------------------------------------------------------------


async def test_connect_passes_on_what_the_client_sent_without_waiting(
        web: OriginServer, stack: FakeStack, os_dialer: OSDialer) -> None:
    """A client that sends its request right behind CONNECT, in the same write: the
    request goes with the dial, the answer comes after the 200."""
    request = (b"CONNECT web:%d HTTP/1.1\r\nHost: web:%d\r\n\r\n" % (web.port, web.port)
               + b"GET /pipelined HTTP/1.0\r\nHost: web\r\n\r\n")
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        out = await raw_exchange(proxy, request)
    assert out.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    assert b"path /pipelined" in out


async def test_unreachable_destination_is_502_with_the_reason(
        web: OriginServer, stack: FakeStack, os_dialer: OSDialer) -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.43.101", 0))
    port = closed.getsockname()[1]
    with closed:
        async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
            rc, out, err = await curl("--proxy", proxy, "-i", f"http://web:{port}/")
            assert rc == 0, err
            assert out.startswith("HTTP/1.1 502 ")
            assert f"cannot reach web:{port}: connection refused" in out
            rc, out, err = await curl("--proxy", proxy, "--proxytunnel", f"http://web:{port}/")
            assert rc != 0 and "502" in err
            rc, out, _ = await curl("--proxy", proxy, f"http://web:{web.port}/")
            assert "hello from web" in out


@pytest.mark.parametrize("request_bytes, status", [
    (b"garbage\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", b"400"),                 # origin-form
    (b"GET https://web/ HTTP/1.1\r\nHost: web\r\n\r\n", b"400"),      # not http://
    (b"GET http://web:99999/ HTTP/1.1\r\nHost: web\r\n\r\n", b"400"),  # bad port
    (b"CONNECT web HTTP/1.1\r\nHost: web\r\n\r\n", b"400"),           # no port
    (b"GET http://web/ HTTP/1.1\r\nHost: web\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
     b"431"),
    (b"GET http://web/ HTTP/1.1\r\nHost: web\r\nBad Header\r\n\r\n", b"400"),
    (b"POST http://web/ HTTP/1.1\r\nHost: web\r\nContent-Length: x\r\n\r\n", b"400"),
], ids=["garbage", "origin-form", "https", "bad-port", "connect-no-port", "huge-headers",
        "bad-header", "bad-length"])
async def test_bad_requests_are_answered_and_closed(
        web: OriginServer, stack: FakeStack, os_dialer: OSDialer, request_bytes: bytes,
        status: bytes) -> None:
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        answer = await raw_exchange(proxy, request_bytes)  # returns once the proxy closes
        rc, out, err = await curl("--proxy", proxy, f"http://web:{web.port}/")
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert rc == 0 and "hello from web" in out, err
    assert stack.calls == [("127.0.42.101", web.port)]  # nothing dialled for the bad ones


async def test_client_vanishing_mid_body_leaves_the_proxy_serving(
        web: OriginServer, stack: FakeStack, os_dialer: OSDialer) -> None:
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        port = int(proxy.rsplit(":", 1)[1])
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(f"POST http://web:{web.port}/u HTTP/1.1\r\nHost: web\r\n"
                                  "Content-Length: 1000000\r\n\r\n".encode() + b"x" * 1000)
            await stream.aclose()
        rc, out, err = await curl("--proxy", proxy, f"http://web:{web.port}/")
    assert rc == 0 and "hello from web" in out, err


async def test_idle_client_is_disconnected(stack: FakeStack, os_dialer: OSDialer) -> None:
    async with http_proxy(make_dialer(stack, os_dialer), idle_timeout=0.2) as proxy:
        assert await raw_exchange(proxy, b"") == b""


def test_target_parsing() -> None:
    assert parse_absolute_uri(b"http://u:p@Web:8080/a/b?c=d") == ("web", 8080, "Web:8080",
                                                                   b"/a/b?c=d")
    assert parse_absolute_uri(b"http://[::1]/") == ("::1", 80, "[::1]", b"/")
    assert parse_absolute_uri(b"HTTP://web") == ("web", 80, "web", b"/")
    assert parse_authority(b"[::1]:443") == ("::1", 443)
    assert parse_authority(b"web:22") == ("web", 22)


async def test_hop_by_hop_headers_stay_here(web: OriginServer, stack: FakeStack,
                                            os_dialer: OSDialer) -> None:
    async with http_proxy(make_dialer(stack, os_dialer)) as proxy:
        answer = await raw_exchange(proxy, (
            f"GET http://web:{web.port}/h HTTP/1.1\r\nHost: elsewhere\r\n"
            "Proxy-Authorization: Basic eDp5\r\nConnection: X-Secret, close\r\n"
            "X-Secret: 1\r\nX-Kept: 2\r\nKeep-Alive: timeout=5\r\n\r\n").encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"host: web:{web.port}\n".encode() in body   # the URI's authority wins
    assert b"x-kept: 2\n" in body
    for hidden in (b"proxy-authorization", b"x-secret", b"keep-alive"):
        assert hidden not in body
