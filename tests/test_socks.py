"""The SOCKS4/4a/5 proxy, driven by curl and by raw sockets for hostile input."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_dialer import TIMEOUT, FakeStack, OriginServer, OSDialer, make_dialer

from norouter_trio.agent.dialer import Dialer
from norouter_trio.agent.socks import serve_socks

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")




@asynccontextmanager
async def socks_proxy(dialer: Dialer, **kwargs: object) -> AsyncIterator[int]:
    """serve_socks on 127.0.0.1:PORT; yields PORT."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_socks(listeners[0], dialer, **kwargs))  # type: ignore[arg-type]
        yield port
        nursery.cancel_scope.cancel()


async def curl(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with trio.fail_after(TIMEOUT + 5):
        out = await trio.run_process(["curl", "-sS", "--max-time", str(TIMEOUT), *args],
                                     capture_stdout=True, capture_stderr=True, check=False,
                                     env=env)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode()


async def raw(port: int, *steps: bytes, eof: bool = False) -> bytes:
    """Send each step, then read everything until the proxy closes."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for step in steps:
                await stream.send_all(step)
            if eof:
                await stream.send_eof()
            out = b""
            while chunk := await stream.receive_some(4096):
                out += chunk
    return out


# --- real clients --------------------------------------------------------------------


@pytest.mark.parametrize("flag, host", [
    ("--socks4", "127.0.42.101"),
    ("--socks4a", "web"), ("--socks4a", "nginx.example.com"), ("--socks4a", "127.0.42.101"),
    ("--socks5", "127.0.42.101"),
    ("--socks5-hostname", "web"), ("--socks5-hostname", "NGINX"),
    ("--socks5-hostname", "127.0.42.101"),
])
async def test_curl_reaches_names_aliases_and_vips_through_the_stack(
        web: OriginServer, flag: str, host: str) -> None:
    stack, os_dialer = FakeStack(), OSDialer()
    async with socks_proxy(make_dialer(stack, os_dialer)) as port:
        rc, out, err = await curl(flag, f"127.0.0.1:{port}", f"http://{host}:{web.port}/s")
    assert rc == 0, err
    assert "hello from web" in out and "path /s" in out
    assert stack.calls == [("127.0.42.101", web.port)]
    assert os_dialer.calls == []


@pytest.mark.parametrize("flag", ["--socks4", "--socks4a", "--socks5", "--socks5-hostname"])
async def test_curl_reaches_other_destinations_through_the_os(
        outside: OriginServer, flag: str) -> None:
    stack, os_dialer = FakeStack(), OSDialer()
    async with socks_proxy(make_dialer(stack, os_dialer)) as port:
        rc, out, err = await curl(flag, f"127.0.0.1:{port}",
                                  f"http://127.0.0.1:{outside.port}/o")
    assert rc == 0, err
    assert "hello from outside" in out
    assert stack.calls == [] and os_dialer.calls == [("127.0.0.1", outside.port)]


async def test_bulk_through_socks5(web: OriginServer) -> None:
    size = 8 * 1024 * 1024 + 3
    async with socks_proxy(make_dialer(FakeStack(), OSDialer())) as port:
        rc, out, err = await curl("--socks5-hostname", f"127.0.0.1:{port}", "-o", "/dev/null",
                                  "-w", "%{size_download}", f"http://web:{web.port}/bytes/{size}")
    assert rc == 0, err
    assert out == str(size)


async def test_early_data_after_the_handshake_is_forwarded(web: OriginServer) -> None:
    """A client that sends its request right behind the SOCKS5 request, unprompted."""
    request = b"\x05\x01\x00" + b"\x05\x01\x00\x03\x03web" + web.port.to_bytes(2, "big") \
        + b"GET /early HTTP/1.0\r\nHost: web\r\n\r\n"
    async with socks_proxy(make_dialer(FakeStack(), OSDialer())) as port:
        out = await raw(port, request)
    assert out[:2] == b"\x05\x00"
    assert out[2:4] == b"\x05\x00" and out[5] == 1  # granted, IPv4 bound address
    assert b"path /early" in out[12:]


# --- refusals ------------------------------------------------------------------------

S5_HELLO = b"\x05\x01\x00"
S5_OK_METHOD = b"\x05\x00"


def s5_reply(rep: int) -> bytes:
    return bytes([5, rep, 0, 1, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("steps, eof, expected", [
    # unknown version: nothing to answer in, just closed
    ([b"\x06\x01\x00"], False, b""),
    ([b"GET / HTTP/1.1\r\n\r\n"], False, b""),
    # SOCKS5: no methods / no acceptable method
    ([b"\x05\x00"], False, b"\x05\xff"),
    ([b"\x05\x02\x01\x02"], False, b"\x05\xff"),
    # SOCKS5: IPv6, BIND, UDP ASSOCIATE, unknown address type, wrong request version
    ([S5_HELLO, b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50"], False,
     S5_OK_METHOD + s5_reply(8)),
    ([S5_HELLO, b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50"], False,
     S5_OK_METHOD + s5_reply(7)),
    ([S5_HELLO, b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"], False,
     S5_OK_METHOD + s5_reply(7)),
    ([S5_HELLO, b"\x05\x01\x00\x09\x00"], False, S5_OK_METHOD + s5_reply(8)),
    ([S5_HELLO, b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50"], False,
     S5_OK_METHOD + s5_reply(1)),
    ([S5_HELLO, b"\x05\x01\x00\x03\x00\x00\x50"], False, S5_OK_METHOD + s5_reply(1)),
    # SOCKS5 truncated: the greeting, then the request cut short
    ([b"\x05\x02\x00"], True, s5_reply(1)),
    ([S5_HELLO, b"\x05\x01\x00\x01\x7f"], True, S5_OK_METHOD + s5_reply(1)),
    # SOCKS4: BIND, user id too long, 4a host name too long, truncated
    ([b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00"], False, b"\x00\x5b" + bytes(6)),
    ([b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300], False, b"\x00\x5b" + bytes(6)),
    ([b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * 300], False, b"\x00\x5b" + bytes(6)),
    ([b"\x04\x01\x00\x50\x7f\x00"], True, b"\x00\x5b" + bytes(6)),
    ([b"\x04\x01\x00\x00\x7f\x00\x00\x01\x00"], False, b"\x00\x5b" + bytes(6)),  # port 0
], ids=["version-6", "http", "no-methods", "no-acceptable-method", "ipv6", "bind",
        "udp-associate", "unknown-atyp", "request-version-4", "empty-name", "truncated-hello",
        "truncated-request", "socks4-bind", "socks4-long-user", "socks4a-long-name",
        "socks4-truncated", "socks4-port-0"])
async def test_bad_handshakes_get_the_protocols_refusal_then_close(
        web: OriginServer, steps: list[bytes], eof: bool, expected: bytes) -> None:
    stack = FakeStack()
    async with socks_proxy(make_dialer(stack, OSDialer())) as port:
        out = await raw(port, *steps, eof=eof)
        rc, good, err = await curl("--socks5-hostname", f"127.0.0.1:{port}",
                                   f"http://web:{web.port}/")
    assert out == expected
    assert rc == 0 and "hello from web" in good, err
    assert stack.calls == [("127.0.42.101", web.port)]  # the bad ones dialled nothing


async def test_unreachable_destinations_get_the_matching_code() -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.43.101", 0))
    port_closed = closed.getsockname()[1]
    with closed:
        async with socks_proxy(make_dialer(FakeStack(), OSDialer())) as port:
            dst = port_closed.to_bytes(2, "big")
            s5 = await raw(port, S5_HELLO, b"\x05\x01\x00\x03\x03web" + dst)
            s4 = await raw(port, b"\x04\x01" + dst + b"\x7f\x00\x2a\x65user\x00")
            s4a = await raw(port, b"\x04\x01" + dst + b"\x00\x00\x00\x01\x00web\x00")
            rc, _, err = await curl("--socks5-hostname", f"127.0.0.1:{port}",
                                    f"http://web:{port_closed}/")
    assert s5 == S5_OK_METHOD + s5_reply(5)   # connection refused
    assert s4 == s4a == b"\x00\x5b" + bytes(6)
    assert rc == 97 and "(5)" in err  # curl: "Can't complete SOCKS5 connection ... (5)"


async def test_stalled_handshake_is_closed(web: OriginServer) -> None:
    async with socks_proxy(make_dialer(FakeStack(), OSDialer()),
                           handshake_timeout=0.3) as port:
        out = await raw(port, b"\x05\x01")   # the method list never comes
    assert out == s5_reply(1)


async def _refuse_all(host: str, port: int, *, initial_data: bytes = b"",
                      nodelay: bool = False) -> trio.abc.Stream:
    raise ConnectionRefusedError(f"{host}:{port}: nothing reachable in this test")


@settings(max_examples=150, deadline=None)
@example(b"\x05")
@example(b"\x05\x01\x00\x05\x01\x00\x03\x03web\x00\x50")
@example(b"\x04\x01\x00\x50\x00\x00\x00\x01\x00web\x00")
@given(st.binary(max_size=64) | st.builds(
    lambda head, tail: head + tail,
    st.sampled_from([b"\x04\x01", b"\x05\x01\x00", b"\x05\x01\x00\x05\x01\x00"]),
    st.binary(max_size=40)))
def test_any_input_ends_with_a_reply_or_silence(data: bytes) -> None:
    """Over an in-memory stream: the handler always finishes (the client half-closes
    after `data`) and whatever it wrote is a well-formed SOCKS answer."""
    from trio.testing import memory_stream_pair

    from norouter_trio.agent.socks import handle_socks_connection

    async def run() -> bytes:
        client, server = memory_stream_pair()
        dialer = Dialer(_refuse_all, hostname_map={"web": "127.0.42.101"},
                        os_connect=_refuse_all)
        out = b""
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: handle_socks_connection(server, dialer,
                                                                   handshake_timeout=2))
                await client.send_all(data)
                await client.send_eof()
                while chunk := await client.receive_some(1024):
                    out += chunk
        return out

    out = trio.run(run)
    if data[:1] == b"\x04":
        assert out in (b"", b"\x00\x5b" + bytes(6))
    elif data[:1] == b"\x05":
        if len(out) == 12:
            assert out[:2] == b"\x05\x00"  # method chosen, then the request's answer
            reply: bytes | None = out[2:]
        elif len(out) == 10:
            reply = out                      # the greeting itself was cut short
        else:
            assert out in (b"", b"\x05\xff")
            reply = None
        if reply is not None:
            assert reply[0] == 5 and reply[1] in (1, 5, 7, 8) and reply[2:4] == b"\x00\x01"
    else:
        assert out == b""
