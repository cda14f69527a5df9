"""The agent data plane against real peers: OS sockets on 127.0.0.1 and a second NetStack
wired back to back with the agent's stack (its packets are the manager's switch here)."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from norouter_trio.agent.pump import join, reset_and_close

TIMEOUT = 20


# ---------------------------------------------------------------- OS helpers


async def os_server(handler: Callable[[trio.SocketStream], Any],
                    nursery: trio.Nursery, ip: str = "127.0.0.1") -> int:
    """A real OS listener on ip:random-port whose connections go to `handler`."""
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, handler, 0, host=ip))
    return int(listeners[0].socket.getsockname()[1])


async def echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
        await stream.send_eof()


async def answer_after_eof_handler(stream: trio.SocketStream) -> None:
    """Reads to EOF, then answers with the sha256 of what it read and 1 MiB more."""
    async with stream:
        h = hashlib.sha256()
        while data := await stream.receive_some(1 << 16):
            h.update(data)
        await stream.send_all(h.hexdigest().encode() + b"\n" + b"z" * (1 << 20))


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(1 << 16):
        out += data
    return bytes(out)


@asynccontextmanager
async def joined_to(port: int) -> AsyncIterator[trio.SocketStream]:
    """A client stream whose far end is `join`ed to an OS connection to 127.0.0.1:port,
    i.e. client <-> [accepted | join | connected] <-> server."""
    async with trio.open_nursery() as nursery:
        async def accept_and_join(accepted: trio.SocketStream) -> None:
            target = await trio.open_tcp_stream("127.0.0.1", port)
            await join(accepted, target)

        middle = await os_server(accept_and_join, nursery)
        client = await trio.open_tcp_stream("127.0.0.1", middle)
        async with client:
            yield client
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- pump / join


async def test_join_carries_half_close() -> None:
    async with trio.open_nursery() as nursery:
        port = await os_server(answer_after_eof_handler, nursery)
        with trio.fail_after(TIMEOUT):
            async with joined_to(port) as client:
                payload = os.urandom(300_000)
                await client.send_all(payload)
                await client.send_eof()   # the server answers only after this EOF
                answer = await read_all(client)
        assert answer == hashlib.sha256(payload).hexdigest().encode() + b"\n" + b"z" * (1 << 20)
        nursery.cancel_scope.cancel()


async def test_join_passes_a_reset_on() -> None:
    async def reset_handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        await reset_and_close(stream)

    async with trio.open_nursery() as nursery:
        port = await os_server(reset_handler, nursery)
        with trio.fail_after(TIMEOUT):
            async with joined_to(port) as client:
                await client.send_all(b"hello")
                with pytest.raises(trio.BrokenResourceError) as info:
                    await read_all(client)
        assert isinstance(info.value.__cause__, ConnectionResetError)
        nursery.cancel_scope.cancel()


async def test_join_backpressure_bounds_what_a_stalled_reader_costs() -> None:
    """The server writes 64 MiB; the client does not read. The writer must stall after the
    socket buffers plus one chunk per hop, then everything arrives intact."""
    total = 64 << 20
    progress = {"sent": 0}
    data = os.urandom(1 << 20)

    async def source_handler(stream: trio.SocketStream) -> None:
        async with stream:
            for _ in range(total // len(data)):
                await stream.send_all(data)
                progress["sent"] += len(data)

    async with trio.open_nursery() as nursery:
        port = await os_server(source_handler, nursery)
        with trio.fail_after(TIMEOUT):
            async with joined_to(port) as client:
                # give the writer time to run into the stall (time is the subject here)
                await trio.sleep(1.0)
                stalled_at = progress["sent"]
                assert stalled_at < 40 << 20, f"writer not held back: {stalled_at} bytes sent"
                got = hashlib.sha256()
                n = 0
                while chunk := await client.receive_some(1 << 16):
                    got.update(chunk)
                    n += len(chunk)
        assert n == total
        assert got.hexdigest() == hashlib.sha256(data * (total // len(data))).hexdigest()
        nursery.cancel_scope.cancel()


async def test_reset_and_close_sends_rst() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await reset_and_close(stream)

    async with trio.open_nursery() as nursery:
        port = await os_server(handler, nursery)
        with trio.fail_after(TIMEOUT):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            with pytest.raises(trio.BrokenResourceError):
                await read_all(client)
            await client.aclose()
        nursery.cancel_scope.cancel()


async def test_join_sends_the_last_data_and_the_fin_of_an_os_peer_in_one_segment() -> None:
    """An OS peer that wrote its answer and closed: the relay's stack side sends both in
    one segment (data + FIN), and a new loopback-style connection sends what was already
    read (`read_available`) with the handshake's ACK."""
    from norouter_trio.agent.pump import read_available
    from norouter_trio.tcp.netstack import NetStack

    a_ip, b_ip = vips()
    sent_by_b: list[tuple[int, bytes]] = []
    b_raw = bytes(int(x) for x in b_ip.split("."))

    async def wire(rx: trio.MemoryReceiveChannel[bytes],
                   tx: trio.MemorySendChannel[bytes], record: bool) -> None:
        async for packet in rx:
            if record and packet[12:16] == b_raw:
                tcp = packet[(packet[0] & 0x0F) * 4:]
                sent_by_b.append((tcp[13], bytes(tcp[(tcp[12] >> 4) * 4:])))
            await tx.send(packet)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            a_out, a_rx = trio.open_memory_channel[bytes](64)
            b_out, b_rx = trio.open_memory_channel[bytes](64)
            a_in_tx, a_in = trio.open_memory_channel[bytes](64)
            b_in_tx, b_in = trio.open_memory_channel[bytes](64)
            sa, sb = NetStack(a_ip, a_out), NetStack(b_ip, b_out)
            nursery.start_soon(wire, a_rx, b_in_tx, False)
            nursery.start_soon(wire, b_rx, a_in_tx, True)
            await nursery.start(sa.run, a_in)
            await nursery.start(sb.run, b_in)
            listener = sb.listen(b_ip, 80)

            # An OS connection whose peer has already answered and shut down writing.
            with socket.create_server(("127.0.0.1", 0)) as lsock:
                peer = socket.create_connection(lsock.getsockname())
                os_side_raw, _ = lsock.accept()
            os_side_raw.setblocking(False)
            os_side = trio.SocketStream(trio.socket.from_stdlib_socket(os_side_raw))
            peer.sendall(b"the request")
            await trio.lowlevel.wait_readable(os_side_raw)
            first = read_available(os_side, 1 << 16)
            assert first == b"the request"
            assert read_available(os_side, 1 << 16) == b""  # nothing more yet, not EOF
            # Linux delivers loopback segments within the sending call: answer and FIN
            # are both waiting when the relay first reads.
            peer.sendall(b"the answer")
            peer.shutdown(socket.SHUT_WR)

            client = await sa.connect(b_ip, 80, initial_data=first)
            server = await listener.accept()
            result: list[Any] = []

            async def relay() -> None:
                result.append(await join(server, os_side))

            nursery.start_soon(relay)
            assert await read_all(client) == b"the answer"
            await client.aclose()
            peer.setblocking(False)
            peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer))
            assert await read_all(peer_stream) == b"the request"  # then the relayed EOF
            await peer_stream.aclose()
            data_segments = [(f, p) for f, p in sent_by_b if p]
            assert data_segments == [(0x19, b"the answer")]  # FIN|PSH|ACK, one segment
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- listen errors


async def test_listen_error_names_address_and_remedy() -> None:
    from norouter_trio.agent.dataplane import DataplaneError, open_os_listener

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DataplaneError) as info:
            await open_os_listener("127.0.0.1", port, "loopback mode")
    text = str(info.value)
    assert f"cannot listen on 127.0.0.1:{port} (loopback mode)" in text
    assert "loopback: {disable: true}" in text


def test_bsd_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from norouter_trio.agent import dataplane

    monkeypatch.setattr(sys, "platform", "darwin")  # the module dataplane reads it from
    e = OSError(errno.EADDRNOTAVAIL, "Can't assign requested address")
    text = str(dataplane.listen_error("127.0.42.102", 80, "loopback mode", e))
    assert "sudo ifconfig lo0 alias 127.0.42.102" in text


# ---------------------------------------------------------------- the data plane


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


_octet = 10 + os.getpid() % 200


def vips() -> tuple[str, str]:
    """Two VIPs unlikely to clash with other test runs on this machine's 127.0.0.0/8."""
    global _octet
    _octet = _octet % 250 + 1
    return f"127.77.{_octet}.1", f"127.77.{_octet}.2"


@asynccontextmanager
async def agent_with_peer(args: Any, peer_vip: str) -> AsyncIterator[Any]:
    """Runs the data plane for `args`, its packets wired to a peer NetStack (and back);
    yields the peer stack, which plays every other host of the virtual network."""
    from norouter_trio.agent.dataplane import run_dataplane
    from norouter_trio.agent.main import AgentLink
    from norouter_trio.tcp.netstack import NetStack

    to_peer_send, to_peer_recv = trio.open_memory_channel[bytes](1024)
    to_agent_send, to_agent_recv = trio.open_memory_channel[bytes](1024)
    events: list[Any] = []
    peer = NetStack(peer_vip, to_agent_send)
    link = AgentLink(inbound=to_agent_recv, outbound=to_peer_send,
                     send_event=events.append, host_label=args.me)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run, to_peer_recv)
        await nursery.start(run_dataplane, args, link)
        yield peer
        nursery.cancel_scope.cancel()


def configure(me: str, **kw: Any) -> Any:
    from norouter_trio.messages import ConfigureArgs

    kw.setdefault("loopback_disable", True)
    kw.setdefault("state_dir_disable", True)
    return ConfigureArgs(me=me, **kw)


async def test_forward_to_os_with_half_close() -> None:
    from norouter_trio.messages import Forward

    me, other = vips()
    async with trio.open_nursery() as nursery:
        port = await os_server(answer_after_eof_handler, nursery)
        args = configure(me, forwards=[Forward(8080, "127.0.0.1", port)])
        with trio.fail_after(TIMEOUT):
            async with agent_with_peer(args, other) as peer:
                stream = await peer.connect(me, 8080)
                payload = os.urandom(500_000)
                await stream.send_all(payload)
                await stream.send_eof()
                answer = await read_all(stream)
                await stream.aclose()
        assert answer.startswith(hashlib.sha256(payload).hexdigest().encode() + b"\n")
        assert len(answer) == 65 + (1 << 20)
        nursery.cancel_scope.cancel()


async def test_forward_to_refusing_target_resets_promptly() -> None:
    from norouter_trio.messages import Forward

    me, other = vips()
    closed = _free_port("127.0.0.1")
    args = configure(me, forwards=[Forward(8080, "127.0.0.1", closed)])
    with trio.fail_after(5):
        async with agent_with_peer(args, other) as peer:
            try:
                stream = await peer.connect(me, 8080)
            except ConnectionRefusedError:
                return  # refused before accepting: just as prompt
            with pytest.raises(trio.BrokenResourceError):
                await read_all(stream)


async def test_forward_target_by_host_name() -> None:
    from norouter_trio.messages import Forward

    me, other = vips()
    async with trio.open_nursery() as nursery:
        port = await os_server(echo_handler, nursery)
        args = configure(me, forwards=[Forward(80, "localhost", port)])
        with trio.fail_after(TIMEOUT):
            async with agent_with_peer(args, other) as peer:
                stream = await peer.connect(me, 80)
                await stream.send_all(b"ping")
                await stream.send_eof()
                assert await read_all(stream) == b"ping"
        nursery.cancel_scope.cancel()


async def test_many_concurrent_forwarded_connections_stay_separate() -> None:
    from norouter_trio.messages import Forward

    me, other = vips()
    async with trio.open_nursery() as nursery:
        port = await os_server(echo_handler, nursery)
        args = configure(me, forwards=[Forward(7, "127.0.0.1", port)])
        results: dict[int, bool] = {}

        async def one(peer: Any, i: int) -> None:
            payload = hashlib.sha256(str(i).encode()).digest() * 2000   # 64 KB, distinct
            stream = await peer.connect(me, 7)
            async with trio.open_nursery() as n:
                async def write() -> None:
                    await stream.send_all(payload)
                    await stream.send_eof()
                n.start_soon(write)
                results[i] = await read_all(stream) == payload
            await stream.aclose()

        with trio.fail_after(TIMEOUT * 2):
            async with agent_with_peer(args, other) as peer, trio.open_nursery() as clients:
                for i in range(40):
                    clients.start_soon(one, peer, i)
        assert results == {i: True for i in range(40)}
        nursery.cancel_scope.cancel()


async def test_loopback_mode_joins_os_listeners_to_the_stack() -> None:
    from norouter_trio.messages import Forward, IPPortProto

    me, other = vips()
    other_port = _free_port(other)
    own_port = _free_port(me)
    async with trio.open_nursery() as nursery:
        echo_port = await os_server(echo_handler, nursery)
        args = configure(me, loopback_disable=False,
                         forwards=[Forward(own_port, "127.0.0.1", echo_port)],
                         others=[IPPortProto(other, other_port)])
        with trio.fail_after(TIMEOUT):
            async with agent_with_peer(args, other) as peer:
                # another host's port: real other:PORT -> stack -> the peer's listener
                async with peer.listen(other, other_port) as lst:
                    client = await trio.open_tcp_stream(other, other_port)
                    far = await lst.accept()
                    await client.send_all(b"to the far host")
                    await client.send_eof()
                    assert await read_all(far) == b"to the far host"
                    await far.send_all(b"and back")   # still open the other way
                    await far.aclose()
                    assert await read_all(client) == b"and back"
                    await client.aclose()
                # our own forward on the real VIP goes straight to the target
                own = await trio.open_tcp_stream(me, own_port)
                await own.send_all(b"own")
                await own.send_eof()
                assert await read_all(own) == b"own"
                await own.aclose()
        nursery.cancel_scope.cancel()


async def test_loopback_mode_resets_when_nobody_listens_far_away() -> None:
    from norouter_trio.messages import IPPortProto

    me, other = vips()
    other_port = _free_port(other)
    args = configure(me, loopback_disable=False, others=[IPPortProto(other, other_port)])
    with trio.fail_after(10):
        async with agent_with_peer(args, other):
            client = await trio.open_tcp_stream(other, other_port)
            with pytest.raises(trio.BrokenResourceError):
                await read_all(client)
            await client.aclose()


async def test_loopback_listen_failure_stops_the_start_with_a_clear_error() -> None:
    from norouter_trio.agent.dataplane import DataplaneError, run_dataplane
    from norouter_trio.agent.main import AgentLink
    from norouter_trio.messages import IPPortProto

    me, other = vips()
    out_send, _out_recv = trio.open_memory_channel[bytes](10)
    _in_send, in_recv = trio.open_memory_channel[bytes](10)
    link = AgentLink(inbound=in_recv, outbound=out_send, send_event=lambda _e: None,
                     host_label=me)
    with socket.socket() as taken:
        taken.bind((other, 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = configure(me, loopback_disable=False, others=[IPPortProto(other, port)])
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                with pytest.raises(DataplaneError, match=f"{other}:{port}.*in use"):
                    await nursery.start(run_dataplane, args, link)


async def test_bastion_connects_through_the_os_first() -> None:
    me, other = vips()
    async with trio.open_nursery() as nursery:
        port = await os_server(echo_handler, nursery)
        args = configure(me)
        with trio.fail_after(TIMEOUT):
            async with agent_with_peer(args, other) as peer:
                # many SYNs for the same destination at once: each gets its own connection
                async def one(i: int) -> None:
                    stream = await peer.connect("127.0.0.1", port)
                    await stream.send_all(b"%d" % i)
                    await stream.send_eof()
                    assert await read_all(stream) == b"%d" % i
                    await stream.aclose()

                async with trio.open_nursery() as clients:
                    for i in range(20):
                        clients.start_soon(one, i)
                # a destination that refuses through the OS is refused in the stack too
                with pytest.raises(ConnectionRefusedError):
                    await peer.connect("127.0.0.1", _free_port("127.0.0.1"))
        nursery.cancel_scope.cancel()


async def test_builtin_dns_is_served_in_the_stack() -> None:
    import struct

    import dns.message

    from norouter_trio.messages import IPPortProto

    me, other = vips()
    args = configure(me, hostname_map={"web": other, "db": "127.77.0.50"},
                     name_servers=[IPPortProto(me, 10053), IPPortProto(other, 10053)])
    with trio.fail_after(TIMEOUT):
        async with agent_with_peer(args, other) as peer:
            stream = await peer.connect(me, 10053)
            wire = dns.message.make_query("DB.", "A").to_wire()
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
            await stream.send_eof()
            data = await read_all(stream)
            await stream.aclose()
    answer = dns.message.from_wire(data[2:])
    assert [r.address for rrset in answer.answer for r in rrset] == ["127.77.0.50"]


async def test_data_plane_ends_when_the_manager_link_ends() -> None:
    from norouter_trio.agent.dataplane import run_dataplane
    from norouter_trio.agent.main import AgentLink
    from norouter_trio.messages import Forward, IPPortProto

    me, _other = vips()
    out_send, _out_recv = trio.open_memory_channel[bytes](10)
    in_send, in_recv = trio.open_memory_channel[bytes](10)
    link = AgentLink(inbound=in_recv, outbound=out_send, send_event=lambda _e: None,
                     host_label=me)
    args = configure(me, forwards=[Forward(80, "127.0.0.1", 9)],
                     name_servers=[IPPortProto(me, 10053)])
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_dataplane, args, link)
            await in_send.aclose()   # EOF from the manager: run_dataplane returns, no error


async def test_os_connect_is_bounded_and_names_the_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that never answers the SYN (a listener whose queue is full: Linux drops
    the SYN) fails after OS_CONNECT_TIMEOUT with the address in the error; a refused one
    fails at once, naming it too."""
    from norouter_trio.agent import dataplane

    monkeypatch.setattr(dataplane, "OS_CONNECT_TIMEOUT", 0.3)
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        queued: list[socket.socket] = []
        try:
            for _ in range(8):  # fill the accept queue; later SYNs are dropped
                c = socket.socket()
                c.setblocking(False)
                with pytest.raises(BlockingIOError):
                    c.connect(("127.0.0.1", port))
                queued.append(c)
            with trio.fail_after(5):
                start = trio.current_time()
                with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
                    s = await dataplane.open_os_stream("127.0.0.1", port)
                    await s.aclose()
                assert trio.current_time() - start >= 0.25
        finally:
            for c in queued:
                c.close()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        refused_port = free.getsockname()[1]  # bound, not listening: refused
        with trio.fail_after(5), pytest.raises(ConnectionRefusedError,
                                               match=f"127.0.0.1:{refused_port}"):
            await dataplane.open_os_stream("127.0.0.1", refused_port)


async def _tcp_pair(listener: trio.SocketListener) -> tuple[trio.SocketStream, trio.SocketStream]:
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    return client, await listener.accept()


@asynccontextmanager
async def os_and_stack_pairs() -> AsyncIterator[tuple[Any, Any, Any, Any]]:
    """(os_far, os_near, stack_near, stack_far): two connected OS sockets and two
    connected stack streams (two NetStacks wired back to back); join the near ones."""
    from norouter_trio.tcp.netstack import NetStack

    a_vip, b_vip = vips()
    to_b_send, to_b_recv = trio.open_memory_channel[bytes](1024)
    to_a_send, to_a_recv = trio.open_memory_channel[bytes](1024)
    stack_a, stack_b = NetStack(a_vip, to_b_send), NetStack(b_vip, to_a_send)
    async with trio.open_nursery() as nursery:
        await nursery.start(stack_a.run, to_a_recv)
        await nursery.start(stack_b.run, to_b_recv)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        async with listener:
            os_far, os_near = await _tcp_pair(listener)
        stack_listener = stack_b.listen(b_vip, 80)
        stack_near = await stack_a.connect(b_vip, 80)
        stack_far = await stack_listener.accept()
        yield os_far, os_near, stack_near, stack_far
        nursery.cancel_scope.cancel()


async def test_join_cancelled_ends_both_directions_and_closes_cleanly() -> None:
    """A cancelled join returns at once with neither direction left running, and closes
    both streams with a FIN (cancellation is not an error of the peers)."""
    async with os_and_stack_pairs() as (os_far, os_near, stack_near, stack_far), \
            trio.open_nursery() as nursery:
        done = trio.Event()
        left_over: list[str] = []

        async def run_join() -> None:
            with trio.CancelScope() as scope:
                nursery.start_soon(_cancel_soon, scope)
                await join(os_near, stack_near)  # both idle: only the cancellation ends it
            assert scope.cancelled_caught
            # nothing of the join (its b->a direction) is left running
            me = trio.lowlevel.current_task()
            left_over.extend(t.name for t in nursery.child_tasks if t is not me)
            done.set()

        with trio.fail_after(TIMEOUT):
            nursery.start_soon(run_join)
            await done.wait()
            assert left_over == []
            assert await os_far.receive_some(10) == b""   # FIN, not a reset
            assert await stack_far.receive_some(10) == b""
        await os_far.aclose()


async def _send_then_reset(stream: Any) -> None:
    await stream.send_all(b"x")
    await reset_and_close(stream)


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.sleep(0.05)
    scope.cancel()


@pytest.mark.parametrize("side", ["os", "stack"])
async def test_join_passes_a_reset_on_while_the_other_direction_is_idle(side: str) -> None:
    """One side resets right after sending a byte, while the other direction waits for
    data that never comes: the other far end gets the reset (the byte may be lost with
    it), and join reports the error. (Repeated: the reset meets the directions in
    varying states.)"""
    for _ in range(10):
        async with os_and_stack_pairs() as (os_far, os_near, stack_near, stack_far):
            resetting, other = (os_far, stack_far) if side == "os" else (stack_far, os_far)
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send_then_reset, resetting)
                    result = await join(os_near, stack_near)
                assert result.error is not None
                assert result.error.startswith("a->b" if side == "os" else "b->a")
                with pytest.raises(trio.BrokenResourceError):
                    while await other.receive_some(10):
                        pass
            if side == "stack":
                await os_far.aclose()
