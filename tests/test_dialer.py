"""The stack-or-OS choice and route resolution, against real sockets.

Also home of the helpers the proxy tests share: `FakeStack` (stands in for
`NetStack.connect`: dials real 127.0.43.x sockets for 127.0.42.x VIPs and records every
dial), `loopback_only_os_connect` (the OS side, refusing anything outside 127/8 so a
wrong choice can never send packets elsewhere) and `OriginServer` (a stdlib HTTP/1.1
server in a thread).
"""

from __future__ import annotations

import hashlib
import http.server
import ipaddress
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from test_dns import fake_upstream, unique_loopback

from norouter_trio.agent.dialer import ByteReader, Dialer, DialError, splice
from norouter_trio.agent.dns import serve_dns
from norouter_trio.messages import Route

TIMEOUT = 20
VIPS = {"web": "127.0.42.101", "nginx": "127.0.42.101", "nginx.example.com": "127.0.42.101",
        "bastion": "127.0.42.150", "local": "127.0.42.100"}


class FakeStack:
    """`connect(ip, port)` like NetStack's, over real sockets.

    A VIP 127.0.42.N dials 127.0.43.N (where the tests' "remote" servers listen, and
    where nothing reachable by the OS path under the VIP's own address would answer);
    other addresses must be mapped explicitly in `mapping`.
    """

    def __init__(self, mapping: dict[tuple[str, int], tuple[str, int]] | None = None,
                 blackhole: frozenset[str] = frozenset()) -> None:
        self.mapping = dict(mapping or {})
        self.blackhole = blackhole  # addresses whose SYNs are never answered
        self.calls: list[tuple[str, int]] = []
        self.first: list[bytes] = []  # each stack dial's initial_data, if any

    async def connect(self, ip: str, port: int, *, initial_data: bytes = b"",
                      nodelay: bool = False) -> trio.abc.Stream:
        """`initial_data` is sent right after connecting (NetStack's rides on the ACK)."""
        self.calls.append((ip, port))
        if initial_data:
            self.first.append(bytes(initial_data))
        if ip in self.blackhole:
            await trio.sleep_forever()
        real = self.mapping.get((ip, port))
        if real is None and ip.startswith("127.0.42."):
            real = ("127.0.43." + ip.rsplit(".", 1)[1], port)
        if real is None:
            raise ConnectionRefusedError(f"fake stack: nothing at {ip}:{port}")
        stream = await trio.open_tcp_stream(*real)
        if initial_data:
            await stream.send_all(initial_data)
        return stream


class OSDialer:
    """The OS side for tests: real connects, but only to 127/8 (network safety)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        self.calls.append((host, port))
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ConnectionRefusedError(f"test OS dialer refuses non-loopback {host}")
        return await trio.open_tcp_stream(host, port)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, body: bytes, status: int = 200, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.server.connections.add(self.client_address)
        path = self.path
        if path.startswith("/bytes/"):
            size = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = bytes(range(256)) * 256
            while size:
                n = min(size, len(block))
                self.wfile.write(block[:n])
                size -= n
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"one,", b"two,", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/eof-body":  # no length, no chunks: the body ends when we close
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until-eof " * 1000)
            self.close_connection = True
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"6\r\nfirst\n\r\n")
            self.wfile.flush()
            self.server.release.wait(TIMEOUT)
            self.wfile.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
        else:
            headers = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items())
            self._reply(f"hello from {self.server.name}\npath {path}\n{headers}".encode())

    def do_POST(self) -> None:
        self.server.connections.add(self.client_address)
        digest = hashlib.sha256()
        total = 0
        for chunk in self._read_body():
            digest.update(chunk)
            total += len(chunk)
        self._reply(f"{total} {digest.hexdigest()}\n".encode())

    do_PUT = do_POST


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    name: str
    connections: set[tuple[str, int]]
    release: threading.Event


class OriginServer:
    """A real HTTP/1.1 server (stdlib, threaded) at ip:port, saying who it is."""

    def __init__(self, ip: str, name: str) -> None:
        self.httpd = _Server((ip, 0), _Handler)
        self.httpd.name = name
        self.httpd.connections = set()
        self.httpd.release = threading.Event()
        self.ip = ip
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def connections(self) -> set[tuple[str, int]]:
        return self.httpd.connections

    def __enter__(self) -> OriginServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)




async def http_get(stream: trio.abc.Stream, host: str, path: str = "/") -> bytes:
    """One HTTP/1.0 GET over `stream`; the whole answer (the server closes)."""
    await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    out = b""
    while data := await stream.receive_some(65536):
        out += data
    return out


def make_dialer(stack: FakeStack, os_dialer: OSDialer, routes: list[Route] | None = None,
                suggestions: list[tuple[list[str], str]] | None = None, **kw: Any) -> Dialer:
    def suggest(ips: list[str], via: str) -> None:
        if suggestions is not None:
            suggestions.append((ips, via))
    return Dialer(stack.connect, hostname_map=VIPS, routes=routes or [],
                  vips=["127.0.42.100"], os_connect=os_dialer, suggest_route=suggest, **kw)


# --- choice --------------------------------------------------------------------------


def test_interesting_destinations() -> None:
    dialer = make_dialer(FakeStack(), OSDialer(), routes=[
        Route(via="127.0.42.150", to_cidr=["198.18.0.0/16"], to_hostname_glob=["*.cloud.test"]),
        Route(via="127.0.42.101", to_cidr=[], to_hostname_glob=["*.cloud.test", "db.*"]),
    ])
    for host in ("web", "NGINX.example.com.", "127.0.42.100", "127.0.42.150", "198.18.9.9",
                 "a.cloud.test", "db.internal"):
        assert dialer.is_interesting(host), host
    for host in ("127.0.0.1", "example.com", "198.20.0.1", "::1", "cloud.test"):
        assert not dialer.is_interesting(host), host
    assert dialer.route_for_name("x.CLOUD.test") == "127.0.42.101"  # later route wins


async def test_names_and_vips_go_through_the_stack(web: OriginServer) -> None:
    stack, os_dialer = FakeStack(), OSDialer()
    dialer = make_dialer(stack, os_dialer)
    for host in ("web", "nginx.example.com", "127.0.42.101"):
        with trio.fail_after(TIMEOUT):
            answer = await http_get(await dialer.dial(host, web.port), host)
        assert b"hello from web" in answer
    assert stack.calls == [("127.0.42.101", web.port)] * 3
    assert os_dialer.calls == []


async def test_other_destinations_go_through_the_os(outside: OriginServer) -> None:
    stack, os_dialer = FakeStack(), OSDialer()
    dialer = make_dialer(stack, os_dialer)
    with trio.fail_after(TIMEOUT):
        answer = await http_get(await dialer.dial("127.0.0.1", outside.port), "127.0.0.1")
    assert b"hello from outside" in answer
    assert stack.calls == [] and os_dialer.calls == [("127.0.0.1", outside.port)]


async def test_cidr_routes_send_the_real_address_through_the_stack(
        outside: OriginServer) -> None:
    stack = FakeStack({("198.18.5.5", 80): ("127.0.0.1", outside.port)})
    os_dialer = OSDialer()
    dialer = make_dialer(stack, os_dialer, routes=[
        Route(via="127.0.42.150", to_cidr=["198.18.0.0/15"], to_hostname_glob=[])])
    with trio.fail_after(TIMEOUT):
        answer = await http_get(await dialer.dial("198.18.5.5", 80), "198.18.5.5")
    assert b"hello from outside" in answer
    assert stack.calls == [("198.18.5.5", 80)] and os_dialer.calls == []


async def test_glob_routes_resolve_through_the_via_hosts_dns(outside: OriginServer) -> None:
    """a.cloud.test -> ask bastion's built-in DNS (through the stack), which relays to its
    own resolver; the answer is dialled through the stack and suggested to the manager."""
    suggestions: list[tuple[list[str], str]] = []
    async with fake_upstream(unique_loopback(55)) as upstream:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        dns_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_dns(listeners[0], {"bastion": "127.0.42.150"},
                                                 resolvers=[(upstream.ip, upstream.port)]))
            stack = FakeStack({("127.0.42.150", 10053): ("127.0.0.1", dns_port),
                               ("198.18.0.7", 80): ("127.0.0.1", outside.port)})
            os_dialer = OSDialer()
            dialer = make_dialer(stack, os_dialer, suggestions=suggestions, routes=[
                Route(via="127.0.42.150", to_cidr=[], to_hostname_glob=["*.upstream.test"])])
            with trio.fail_after(TIMEOUT):
                first = await http_get(await dialer.dial("db.upstream.test", 80), "db")
                second = await http_get(await dialer.dial("DB.upstream.test.", 80), "db")
                third = await http_get(await dialer.dial("198.18.0.7", 80), "db")
            nursery.cancel_scope.cancel()
    for answer in (first, second, third):
        assert b"hello from outside" in answer
    assert suggestions == [(["198.18.0.7"], "127.0.42.150")]  # once: then remembered
    assert stack.calls == [("127.0.42.150", 10053), ("198.18.0.7", 80),
                           ("198.18.0.7", 80), ("198.18.0.7", 80)]  # cached name
    assert os_dialer.calls == []
    assert upstream.queries == [("udp", "db.upstream.test.")]


async def test_routed_name_that_does_not_resolve_is_a_dial_error() -> None:
    async with fake_upstream(unique_loopback(55)) as upstream:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        dns_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_dns(listeners[0], {},
                                                 resolvers=[(upstream.ip, upstream.port)]))
            stack = FakeStack({("127.0.42.150", 10053): ("127.0.0.1", dns_port)})
            dialer = make_dialer(stack, OSDialer(), routes=[
                Route(via="127.0.42.150", to_cidr=[], to_hostname_glob=["*.test"])])
            with pytest.raises(DialError) as info, trio.fail_after(TIMEOUT):
                await dialer.dial("missing.test", 80)
            nursery.cancel_scope.cancel()
    assert info.value.code == "resolve" and "NXDOMAIN" in str(info.value)
    assert "missing.test:80" in str(info.value)


async def test_dns_of_an_unreachable_via_host_fails_in_bounded_time() -> None:
    dialer = make_dialer(FakeStack(blackhole=frozenset({"198.18.0.1"})), OSDialer(),
                         dns_timeout=0.5, routes=[
        Route(via="198.18.0.1", to_cidr=[], to_hostname_glob=["*.test"])])
    with pytest.raises(DialError) as info, trio.fail_after(TIMEOUT):
        await dialer.dial("x.test", 80)
    assert info.value.code == "resolve" and "198.18.0.1:10053" in str(info.value)
    assert "did not answer within 0.5s" in str(info.value)


async def test_dial_errors_say_what_failed(web: OriginServer) -> None:
    dialer = make_dialer(FakeStack(), OSDialer(), connect_timeout=2)
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]  # bound, not listening: refused
    with closed:
        for host, code in (("web", "refused"), ("127.0.0.1", "refused")):
            with pytest.raises(DialError) as info, trio.fail_after(TIMEOUT):
                await dialer.dial(host, port)
            assert info.value.code == code, host
            assert f"{host}:{port}" in str(info.value) and "refused" in str(info.value)
    with pytest.raises(DialError):
        await dialer.dial("web", 0)


# --- stream helpers ------------------------------------------------------------------


@asynccontextmanager
async def stream_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    async with client, server:
        yield client, server


async def test_splice_passes_data_and_half_closes_both_ways() -> None:
    async with stream_pair() as (a_out, a_in), stream_pair() as (b_in, b_out), \
            trio.open_nursery() as nursery:
        nursery.start_soon(lambda: splice(a_in, b_in, a_to_b_first=b"early:"))
        with trio.fail_after(TIMEOUT):
            await a_out.send_all(b"ping")
            await a_out.send_eof()
            got = b""
            while data := await b_out.receive_some(100):
                got += data
            assert got == b"early:ping"
            # The other direction still works after the half-close.
            await b_out.send_all(b"pong")
            await b_out.send_eof()
            back = b""
            while data := await a_out.receive_some(100):
                back += data
            assert back == b"pong"


async def test_splice_passes_a_reset_on_to_the_other_side() -> None:
    """A reset on one side resets the other (as the data plane's pumps do), promptly."""
    async with stream_pair() as (a_out, a_in), stream_pair() as (b_in, b_out), \
            trio.open_nursery() as nursery:
        nursery.start_soon(splice, a_in, b_in)
        with trio.fail_after(TIMEOUT):
            await a_out.send_all(b"ping")
            assert await b_out.receive_some(100) == b"ping"
            b_out.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            await b_out.aclose()  # RST
            with pytest.raises(trio.BrokenResourceError):
                while await a_out.receive_some(100):
                    pass


async def test_dial_sends_the_initial_data_first(web: OriginServer,
                                                 outside: OriginServer) -> None:
    """The first bytes go with the dial: handed to the stack's connect (to ride on the
    handshake's ACK), sent right after connecting through the OS."""
    fake = FakeStack()
    dialer = make_dialer(fake, OSDialer())
    request = b"GET /first HTTP/1.0\r\nHost: x\r\n\r\n"
    for host, port in (("web", web.port), ("127.0.0.1", outside.port)):
        with trio.fail_after(TIMEOUT):
            stream = await dialer.dial(host, port, initial_data=request)
            async with stream:
                out = b""
                while data := await stream.receive_some(65536):
                    out += data
        assert b"path /first" in out
    assert fake.first == [request]


async def test_byte_reader() -> None:
    async with stream_pair() as (a, b):
        await a.send_all(b"\x05\x01\x00user\x00name\x00rest")
        reader = ByteReader(b)
        with trio.fail_after(TIMEOUT):
            assert await reader.read_exactly(3) == b"\x05\x01\x00"
            assert await reader.read_until(b"\x00", 255) == b"user"
            assert await reader.read_until(b"\x00", 255) == b"name"
            assert await reader.read_exactly(2) == b"re"
            assert reader.take_buffered() == b"st"
            await a.send_all(b"x" * 300)
            with pytest.raises(ValueError):
                await reader.read_until(b"\x00", 255)
            await a.send_eof()
            reader.take_buffered()
            with pytest.raises(EOFError):
                await reader.read_exactly(1)


# --- end to end: two NetStacks joined by memory channels ------------------------------


class _Link:
    """The parts of AgentLink the services use."""

    def __init__(self, label: str) -> None:
        self.host_label = label
        self.events: list[Any] = []

    def send_event(self, event: Any) -> None:
        self.events.append(event)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _curl(*args: str) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with trio.fail_after(TIMEOUT + 5):
        out = await trio.run_process(["curl", "-sS", "--max-time", str(TIMEOUT), *args],
                                     capture_stdout=True, capture_stderr=True, check=False,
                                     env=env)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode()


async def test_end_to_end_through_two_netstacks(outside: OriginServer, tmp_path: Any) -> None:
    """Agent A (127.0.42.100) runs the proxies; agent B (127.0.42.101, "web") runs the
    DNS, a forward 8080 -> an OS web server, and bastion mode for 198.18.0.7:80. Their
    stacks exchange real IPv4 packets over memory channels, as through a manager."""
    import shutil

    if shutil.which("curl") is None or shutil.which("dig") is None:
        pytest.skip("needs curl and dig")
    netstack = pytest.importorskip("norouter_trio.tcp.netstack")
    from norouter_trio.agent.http_proxy import serve_http_proxy
    from norouter_trio.agent.socks import serve_socks
    from norouter_trio.messages import ConfigureArgs, IPPortProto, RouteSuggestion

    names = {"web": "127.0.42.101", "nginx": "127.0.42.101", "local": "127.0.42.100"}
    servers = [IPPortProto("127.0.42.100", 10053), IPPortProto("127.0.42.101", 10053)]
    route = Route(via="127.0.42.101", to_cidr=["198.19.0.0/16"],
                  to_hostname_glob=["*.upstream.test"])
    http_port, socks_port = _free_port(), _free_port()
    args_a = ConfigureArgs(me="127.0.42.100", hostname_map=names, name_servers=servers,
                           routes=[route], http_listen=f"127.0.0.1:{http_port}",
                           socks_listen=f"127.0.0.1:{socks_port}")
    link_a = _Link("A")
    with OriginServer("127.0.0.1", "web") as web:
        async with AsyncExitStack() as exits:
            try:  # resolv.conf has no port numbers: the fake resolver needs port 53
                upstream = await exits.enter_async_context(fake_upstream(unique_loopback(56),
                                                                         53))
            except OSError as exc:
                pytest.skip(f"cannot bind port 53 for the fake resolver: {exc}")
            nursery = await exits.enter_async_context(trio.open_nursery())
            conf = tmp_path / "resolv.conf"
            conf.write_text(f"nameserver {upstream.ip}\n")
            a_out, b_in = trio.open_memory_channel[bytes](1024)
            b_out, a_in = trio.open_memory_channel[bytes](1024)
            stack_a = netstack.NetStack("127.0.42.100", a_out)
            stack_b = netstack.NetStack("127.0.42.101", b_out)
            await nursery.start(stack_a.run, a_in)
            await nursery.start(stack_b.run, b_in)

            # B: DNS in the stack (as the data plane serves it), forward 8080, bastion for
            # 198.18.0.7:80.
            nursery.start_soon(partial(serve_dns, stack_b.listen("127.0.42.101", 10053),
                                       names, resolv_conf=str(conf)))

            async def forward(stream: trio.abc.Stream) -> None:
                await splice(stream, await trio.open_tcp_stream("127.0.0.1", web.port))

            nursery.start_soon(trio.serve_listeners, forward,
                               [stack_b.listen("127.0.42.101", 8080)])

            async def bastion(pending: Any) -> None:
                if pending.local != ("198.18.0.7", 80):
                    pending.refuse()
                    return
                target = await trio.open_tcp_stream("127.0.0.1", outside.port)
                await splice(await pending.accept(), target)

            stack_b.accept_any(bastion)

            # Loopback mode's DNS listener on A, as the data plane makes it.
            dns_os = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]

            async def to_b_dns(stream: trio.abc.Stream) -> None:
                await splice(stream, await stack_a.connect("127.0.42.101", 10053))

            nursery.start_soon(trio.serve_listeners, to_b_dns, [dns_os])
            dns_port = dns_os.socket.getsockname()[1]

            # A: the proxies and their shared dialer, as the data plane makes them.
            dialer_a = Dialer.from_args(args_a, stack_a.connect, link_a.send_event,
                                        label="127.0.42.100")
            for port, serve in ((http_port, serve_http_proxy), (socks_port, serve_socks)):
                (lst,) = await trio.open_tcp_listeners(port, host="127.0.0.1")
                nursery.start_soon(serve, lst, dialer_a)
            proxy = f"http://127.0.0.1:{http_port}"
            socks = f"127.0.0.1:{socks_port}"

            for extra in ([], ["--proxytunnel"]):
                assert "hello from web" in await _curl("--proxy", proxy, *extra,
                                                       "http://nginx:8080/x")
            assert "hello from web" in await _curl("--socks5-hostname", socks,
                                                   "http://web:8080/")
            assert "hello from web" in await _curl("--socks4", socks,
                                                   "http://127.0.42.101:8080/")
            big = await _curl("--proxy", proxy, "-o", "/dev/null", "-w", "%{size_download}",
                              "http://web:8080/bytes/3000000")
            assert big == "3000000"
            assert "hello from outside" in await _curl(
                "--proxy", proxy, f"http://127.0.0.1:{outside.port}/")

            dig = ["dig", "+tcp", "-p", str(dns_port), "@127.0.0.1", "+short", "+time=5",
                   "+tries=1"]
            with trio.fail_after(TIMEOUT):
                local = await trio.run_process([*dig, "WEB"], capture_stdout=True)
                relayed = await trio.run_process([*dig, "x.upstream.test"],
                                                 capture_stdout=True)
            assert local.stdout.decode().split() == ["127.0.42.101"]
            assert relayed.stdout.decode().split() == ["198.18.0.7"]

            # Route by glob: asked of B's DNS through the stack, reached via B's bastion.
            assert "hello from outside" in await _curl("--proxy", proxy,
                                                       "http://db.upstream.test/")
            assert link_a.events == [RouteSuggestion(ip=["198.18.0.7"], route="127.0.42.101")]
            nursery.cancel_scope.cancel()

