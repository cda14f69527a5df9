"""Built-in DNS over TCP, queried with dig and raw sockets; relaying to a fake upstream
resolver run on a 127.x address by the test (never the real internet)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rrset
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from norouter_trio.agent.dns import (
    DNSResponder,
    formerr_for,
    read_resolv_conf,
    serve_dns,
)

HOSTS = {"web": "127.0.42.101", "nginx": "127.0.42.101", "nginx.example.com": "127.0.42.101",
         "Bastion": "127.0.42.150", "dotted.example.": "127.0.42.102"}
TIMEOUT = 20


class FakeUpstream:
    """A resolver on UDP+TCP: `*.upstream.test` -> 198.18.0.7, anything else NXDOMAIN.

    Names starting `big.` get a truncated (TC) UDP answer so clients must retry on TCP;
    `silent.upstream.test` gets no answer at all. Records (transport, name) per query.
    """

    def __init__(self, ip: str, port: int = 0) -> None:
        self.ip = ip
        self.port = port
        self.queries: list[tuple[str, str]] = []

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        name = query.question[0].name.to_text().lower()
        self.queries.append((transport, name))
        if name.startswith("silent."):
            return None
        response = dns.message.make_response(query)
        if name.endswith(".upstream.test."):
            if transport == "udp" and name.startswith("big."):
                response.flags |= dns.flags.TC
            else:
                response.answer.append(dns.rrset.from_text(
                    query.question[0].name, 30, "IN", "A", "198.18.0.7"))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    async def bind(self) -> tuple[trio.socket.SocketType, trio.SocketListener]:
        """Bind UDP and TCP on the same port (OSError if that is impossible)."""
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await udp.bind((self.ip, self.port))
            self.port = udp.getsockname()[1]
            await tcp.bind((self.ip, self.port))
            tcp.listen(16)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return udp, trio.SocketListener(tcp)

    async def _udp_loop(self, udp: trio.socket.SocketType) -> None:
        while True:
            data, peer = await udp.recvfrom(65535)
            out = self.answer(data, "udp")
            if out is not None:
                await udp.sendto(out, peer)

    async def _tcp_conn(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    size = int.from_bytes(buf[:2], "big")
                    out = self.answer(buf[2:2 + size], "tcp")
                    buf = buf[2 + size:]
                    if out is not None:
                        await stream.send_all(len(out).to_bytes(2, "big") + out)


def unique_loopback(third: int) -> str:
    """A 127/8 address no other test run uses (derived from the pid)."""
    pid = os.getpid()
    return f"127.{third}.{(pid >> 8) & 0xFF}.{(pid & 0xFF) or 1}"


@asynccontextmanager
async def fake_upstream(ip: str, port: int = 0) -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream(ip, port)
    udp, listener = await upstream.bind()
    with udp:
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(upstream._udp_loop, udp)
            nursery.start_soon(trio.serve_listeners, upstream._tcp_conn, [listener])
            yield upstream
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def dns_server(hostname_map: Mapping[str, str], **kwargs: object,
                     ) -> AsyncIterator[int]:
    """serve_dns on a real OS listener at 127.0.0.1:PORT; yields PORT."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_dns(listeners[0], hostname_map, **kwargs))  # type: ignore[arg-type]
        yield port
        nursery.cancel_scope.cancel()


async def dig(port: int, *args: str) -> str:
    if shutil.which("dig") is None:
        pytest.skip("dig (dnsutils) is not installed")
    with trio.fail_after(TIMEOUT):
        out = await trio.run_process(
            ["dig", "+tcp", "-p", str(port), "@127.0.0.1", "+time=5", "+tries=1", *args],
            capture_stdout=True, check=False)
    return out.stdout.decode()


async def query_raw(port: int, payloads: Sequence[bytes]) -> list[bytes]:
    """Send framed payloads on one connection, read answers until the server closes
    or a second of silence follows the last one."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"".join(len(p).to_bytes(2, "big") + p for p in payloads))
            buf = b""
            answers: list[bytes] = []
            while True:
                with trio.move_on_after(1) as quiet:
                    data = await stream.receive_some(65536)
                if quiet.cancelled_caught or not data:
                    return answers
                buf += data
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    size = int.from_bytes(buf[:2], "big")
                    answers.append(buf[2:2 + size])
                    buf = buf[2 + size:]


# --- local answers -------------------------------------------------------------------


@pytest.mark.parametrize("name, vip", [
    ("web", "127.0.42.101"), ("nginx", "127.0.42.101"),
    ("nginx.example.com", "127.0.42.101"), ("NGINX.Example.COM", "127.0.42.101"),
    ("bastion.", "127.0.42.150"), ("dotted.example", "127.0.42.102"),
])
async def test_dig_answers_names_and_aliases(name: str, vip: str) -> None:
    async with dns_server(HOSTS, resolvers=[]) as port:
        out = await dig(port, name, "A")
    assert "status: NOERROR" in out
    assert f"\t{vip}" in out.split("ANSWER SECTION:")[1]
    assert " aa " in out.split("flags:")[1].split(";")[0] + " "


async def test_other_types_for_a_known_name_are_empty_not_relayed() -> None:
    async with fake_upstream(unique_loopback(53)) as upstream, \
            dns_server(HOSTS, resolvers=[(upstream.ip, upstream.port)]) as port:
        out = await dig(port, "web", "AAAA")
    assert "status: NOERROR" in out and "ANSWER: 0" in out
    assert upstream.queries == []


# --- relaying ------------------------------------------------------------------------


async def test_unknown_names_are_relayed_over_udp() -> None:
    async with fake_upstream(unique_loopback(53)) as upstream, \
            dns_server(HOSTS, resolvers=[(upstream.ip, upstream.port)]) as port:
        found = await dig(port, "db.upstream.test", "A")
        missing = await dig(port, "nothing.example", "A")
    assert "198.18.0.7" in found.split("ANSWER SECTION:")[1]
    assert "status: NXDOMAIN" in missing
    assert upstream.queries == [("udp", "db.upstream.test."), ("udp", "nothing.example.")]


async def test_truncated_udp_answer_is_retried_over_tcp() -> None:
    async with fake_upstream(unique_loopback(53)) as upstream, \
            dns_server(HOSTS, resolvers=[(upstream.ip, upstream.port)]) as port:
        out = await dig(port, "big.upstream.test", "A")
    assert "198.18.0.7" in out
    assert upstream.queries == [("udp", "big.upstream.test."), ("tcp", "big.upstream.test.")]


async def test_failing_resolvers_give_an_empty_answer_in_bounded_time() -> None:
    # One resolver never answers, the next refuses TCP and has no UDP server.
    async with fake_upstream(unique_loopback(53)) as upstream, \
            dns_server(HOSTS, resolvers=[(upstream.ip, upstream.port), ("127.0.0.1", 9)],
                       attempt_timeout=0.3, total_timeout=2.0) as port:
        start = trio.current_time()
        out = await dig(port, "silent.upstream.test", "A")
        elapsed = trio.current_time() - start
        again = await dig(port, "web", "A")  # still serving
    assert "ANSWER: 0" in out and "status: SERVFAIL" in out
    assert elapsed < 10
    assert "127.0.42.101" in again


async def test_resolvers_come_from_resolv_conf(tmp_path: Path) -> None:
    ip = unique_loopback(54)
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"# test\nsearch example\nnameserver {ip}  # ours\noptions ndots:1\n")
    assert read_resolv_conf(conf) == [(ip, 53)]
    async with AsyncExitStack() as stack:
        try:
            upstream = await stack.enter_async_context(fake_upstream(ip, 53))
        except OSError as exc:  # port 53 needs root, or is taken by a wildcard listener
            pytest.skip(f"cannot bind {ip}:53 for the fake resolver: {exc}")
        async with dns_server(HOSTS, resolv_conf=conf) as port:
            out = await dig(port, "x.upstream.test", "A")
    assert "198.18.0.7" in out
    assert upstream.queries == [("udp", "x.upstream.test.")]


def test_resolv_conf_without_nameservers_means_localhost(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver not-an-ip\nnameserver ::1\n;nameserver 10.0.0.1\n")
    assert read_resolv_conf(conf) == [("::1", 53)]
    conf.write_text("")
    assert read_resolv_conf(conf) == [("127.0.0.1", 53)]
    assert read_resolv_conf(tmp_path / "missing") == [("127.0.0.1", 53)]


# --- framing and hostile input -------------------------------------------------------


async def test_several_queries_on_one_connection() -> None:
    queries = [dns.message.make_query(n, "A") for n in ("web.", "nginx.", "bastion.")]
    async with dns_server(HOSTS, resolvers=[]) as port:
        answers = await query_raw(port, [q.to_wire() for q in queries])
        # dig itself, several names over one kept-open connection
        out = await dig(port, "+keepopen", "web", "A", "nginx.example.com", "A")
    by_id = {dns.message.from_wire(a).id: dns.message.from_wire(a) for a in answers}
    assert sorted(by_id) == sorted(q.id for q in queries)
    for q in queries:
        assert by_id[q.id].answer[0][0].address in ("127.0.42.101", "127.0.42.150")
    assert out.count("127.0.42.101") >= 2


async def test_garbage_gets_formerr_or_is_dropped_and_the_server_goes_on() -> None:
    good = dns.message.make_query("web.", "A")
    garbage = b"\x12\x34\x01\x00" + b"\xff" * 30     # a header, then nonsense
    tiny = b"\x01\x02\x03"                             # not even a header
    response_in = dns.message.make_response(good).to_wire()  # QR set: never answered
    async with dns_server(HOSTS, resolvers=[]) as port:
        answers = await query_raw(port, [garbage, tiny, response_in, b"", good.to_wire()])
        # A length prefix promising more than is sent, then EOF.
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"\xff\xff" + b"x" * 100)
            await stream.send_eof()
            assert await stream.receive_some(100) == b""
            await stream.aclose()
        out = await dig(port, "web", "A")
    assert len(answers) == 2
    formerr = answers[0]
    assert struct.unpack("!H", formerr[:2])[0] == 0x1234
    assert dns.message.from_wire(formerr).rcode() == dns.rcode.FORMERR
    assert dns.message.from_wire(answers[1]).id == good.id
    assert "127.0.42.101" in out


async def test_responder_rejects_what_it_cannot_serve() -> None:
    responder = DNSResponder(HOSTS, [])
    notify = dns.message.make_query("web.", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    out = await responder.respond(notify.to_wire())
    assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.NOTIMP
    empty = dns.message.make_query("web.", "A")
    empty.question = []
    out = await responder.respond(empty.to_wire())
    assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.FORMERR
    assert formerr_for(b"\x00" * 5) is None


async def test_idle_connection_is_closed() -> None:
    async with dns_server(HOSTS, resolvers=[], idle_timeout=0.2) as port:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            assert await stream.receive_some(10) == b""
            await stream.aclose()



@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.builds(
    lambda head, tail: head + tail, st.sampled_from(
        [dns.message.make_query("web.", "A").to_wire()[:12]]), st.binary(max_size=80)))
def test_responder_never_raises_on_arbitrary_input(wire: bytes) -> None:
    responder = DNSResponder(HOSTS, [])   # no resolvers: a relay ends at once
    out = trio.run(responder.respond, wire)
    if out is not None:
        assert len(out) >= 12 and out[:2] == wire[:2]  # same id
        assert dns.message.from_wire(out).flags & dns.flags.QR
