"""The trio layer: two NetStacks joined by memory channels behave like sockets."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from norouter_trio.tcp.connection import TCPConfig
from norouter_trio.tcp.netstack import NetStack, PendingConnection, TCPListener, TCPStream
from norouter_trio.tcp.state import TCPState

A, B = "127.0.42.101", "127.0.42.102"
Tap = Callable[[bytes], "bytes | None"]  # the packet to pass on (maybe altered), or None


async def _pipe(
    rx: trio.MemoryReceiveChannel[bytes], tx: trio.MemorySendChannel[bytes], tap: list[Tap]
) -> None:
    async with rx, tx:
        async for packet in rx:
            out: bytes | None = packet
            for f in tap:
                if out is not None:
                    out = f(out)
            if out is not None:
                await tx.send(out)


@asynccontextmanager
async def two_stacks(
    config: TCPConfig | None = None,
    *,
    verify: bool = True,
    tap: list[Tap] | None = None,
) -> AsyncIterator[tuple[NetStack, NetStack, trio.Nursery]]:
    """A and B, each with its own bounded in/out channels, joined by pump tasks."""
    taps = tap if tap is not None else []
    async with trio.open_nursery() as nursery:
        a_out, a_out_rx = trio.open_memory_channel[bytes](64)
        b_out, b_out_rx = trio.open_memory_channel[bytes](64)
        a_in_tx, a_in = trio.open_memory_channel[bytes](64)
        b_in_tx, b_in = trio.open_memory_channel[bytes](64)
        sa = NetStack(A, a_out, verify_checksums=verify, config=config)
        sb = NetStack(B, b_out, verify_checksums=verify, config=config)
        nursery.start_soon(_pipe, a_out_rx, b_in_tx, taps)
        nursery.start_soon(_pipe, b_out_rx, a_in_tx, taps)
        await nursery.start(sa.run, a_in)
        await nursery.start(sb.run, b_in)
        yield sa, sb, nursery
        nursery.cancel_scope.cancel()


async def _pair(sa: NetStack, sb: NetStack, port: int) -> tuple[TCPStream, TCPStream]:
    listener = sb.listen(B, port)
    async with trio.open_nursery() as nursery:
        accepted: list[TCPStream] = []

        async def acc() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(acc)
        client = await sa.connect(B, port)
    await listener.aclose()
    return client, accepted[0]


async def _send_while_receiving(client: TCPStream, server: TCPStream,
                                payload: bytes) -> bytes:
    """Send `payload` from client while server reads as many bytes; what server got."""
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        while len(got) < len(payload):
            got += await server.receive_some()
    return bytes(got)


async def test_check_half_closeable_stream() -> None:
    small = TCPConfig(send_buffer=16384, recv_buffer=16384)
    with trio.fail_after(30):
        async with two_stacks(small) as (sa, sb, _):
            ports = iter(range(1000, 2000))

            async def maker() -> tuple[TCPStream, TCPStream]:
                return await _pair(sa, sb, next(ports))

            async def clogged() -> tuple[TCPStream, TCPStream]:
                client, server = await maker()
                # Fill both send buffers and receive windows: both send_alls park
                # (the checker clogs each direction in turn).
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_all, b"x" * (1 << 20))
                    nursery.start_soon(server.send_all, b"y" * (1 << 20))
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.cancel_scope.cancel()
                return client, server

            await trio.testing.check_half_closeable_stream(maker, clogged)


async def test_bulk_transfer_many_connections_intact() -> None:
    with trio.fail_after(60):
        async with two_stacks() as (sa, sb, _):
            listener = sb.listen(B, 5000)
            blobs = [bytes([i]) * 1000 + bytes(range(256)) * (200 + 37 * i) for i in range(16)]
            received: dict[int, bytes] = {}

            async def serve_one(stream: TCPStream) -> None:
                chunks = []
                async with stream:
                    while data := await stream.receive_some():
                        chunks.append(data)
                    blob = b"".join(chunks)
                    received[blob[0]] = blob
                    await stream.send_all(len(blob).to_bytes(4, "big"))

            async def server() -> None:
                async with trio.open_nursery() as nursery:
                    for _ in blobs:
                        nursery.start_soon(serve_one, await listener.accept())

            async def client(blob: bytes) -> None:
                stream = await sa.connect(B, 5000)
                assert stream.local_address[0] == A and stream.remote_address == (B, 5000)
                await stream.send_all(blob)
                await stream.send_eof()
                assert await stream.receive_some() == len(blob).to_bytes(4, "big")
                assert await stream.receive_some() == b""
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(server)
                for blob in blobs:
                    nursery.start_soon(client, blob)
            assert received == {blob[0]: blob for blob in blobs}
            assert sa.counters["bytes_out"] >= sum(map(len, blobs))
            assert sb.counters["drop_bad_checksum"] == 0


async def test_refused_and_timed_out_connects(autojump_clock: trio.testing.MockClock) -> None:
    config = TCPConfig(syn_retries=2, initial_rto=0.5)
    async with two_stacks(
        config, tap=[lambda p: None if p[16:20] == bytes([198, 18, 0, 1]) else p]
    ) as (sa, _, _):
        with pytest.raises(ConnectionRefusedError, match=r"127\.0\.42\.102:7"):
            await sa.connect(B, 7)
        with pytest.raises(TimeoutError, match=r"198\.18\.0\.1:80"):
            await sa.connect("198.18.0.1", 80)  # black-holed by the tap
        with pytest.raises(ValueError, match="not an IPv4 address"):
            await sa.connect("nonsense", 80)


async def test_lossy_link_recovers(autojump_clock: trio.testing.MockClock) -> None:
    count = 0

    def drop_every_7th(packet: bytes) -> bytes | None:
        nonlocal count
        count += 1
        return None if count % 7 == 0 else packet

    async with two_stacks(tap=[drop_every_7th]) as (sa, sb, _):
        client, server = await _pair(sa, sb, 6000)
        payload = bytes(range(256)) * 2000
        assert await _send_while_receiving(client, server, payload) == payload


async def test_slow_reader_closes_window_and_bounds_memory() -> None:
    config = TCPConfig(send_buffer=65536, recv_buffer=65536)
    with trio.fail_after(30):
        async with two_stacks(config) as (sa, sb, _):
            client, server = await _pair(sa, sb, 6001)
            sent = 0

            async def writer() -> None:
                nonlocal sent
                while True:
                    await client.send_all(b"z" * 4096)
                    sent += 4096

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await trio.testing.wait_all_tasks_blocked()
                # Nobody reads: the writer is stuck with both buffers full, no more.
                client_tcp = sa.stack.connections[(A, client.local_address[1], B, 6001)].tcp
                server_tcp = sb.stack.connections[(B, 6001, A, client.local_address[1])].tcp
                assert server_tcp.readable_bytes <= 65536
                assert client_tcp.bytes_in_send_buffer <= 65536
                assert sent <= 2 * 65536 + 4096
                stuck_at = sent
                got = 0
                while got < 10 * 65536:
                    got += len(await server.receive_some())
                assert sent > stuck_at  # reading reopened the window
                nursery.cancel_scope.cancel()


async def test_close_abort_and_half_close() -> None:
    with trio.fail_after(30):
        async with two_stacks() as (sa, sb, _):
            client, server = await _pair(sa, sb, 6002)
            await client.send_all(b"request")
            await client.send_eof()
            assert await server.receive_some() == b"request"
            assert await server.receive_some() == b""
            await server.send_all(b"response")  # the other direction still works
            await server.aclose()
            assert await client.receive_some() == b"response"
            assert await client.receive_some() == b""
            await client.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await client.send_all(b"x")

            client, server = await _pair(sa, sb, 6003)
            client.abort()
            with pytest.raises(trio.BrokenResourceError, match="was reset"):
                await server.receive_some()
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_some()


async def test_cancelled_scope_closes_gracefully() -> None:
    with trio.fail_after(30):
        async with two_stacks() as (sa, sb, _):
            client, server = await _pair(sa, sb, 6004)
            with trio.CancelScope() as scope:
                async with client:
                    await client.send_all(b"last words")
                    scope.cancel()
                    await trio.sleep_forever()
            assert await server.receive_some() == b"last words"
            assert await server.receive_some() == b""  # FIN, not RST


async def test_accept_any_accept_and_refuse() -> None:
    decided: list[tuple[tuple[str, int], tuple[str, int]]] = []

    async def handler(pending: PendingConnection) -> None:
        decided.append((pending.local, pending.remote))
        if pending.local[1] != 22:
            pending.refuse()
            return
        stream = await pending.accept()
        assert stream.local_address == ("198.18.0.5", 22)
        async with stream:
            await stream.send_all(b"SSH-2.0-bastion\r\n")

    with trio.fail_after(30):
        async with two_stacks() as (sa, sb, _):
            sb.accept_any(handler)
            stream = await sa.connect("198.18.0.5", 22)
            assert await stream.receive_some() == b"SSH-2.0-bastion\r\n"
            assert await stream.receive_some() == b""
            await stream.aclose()
            with pytest.raises(ConnectionRefusedError):
                await sa.connect("198.18.0.5", 23)
            assert [d[0] for d in decided] == [("198.18.0.5", 22), ("198.18.0.5", 23)]
            assert sb.counters["accept_any_offered"] == 2
            sb.accept_any(None)
            with pytest.raises(ConnectionRefusedError):
                await sa.connect(B, 24)  # no hook, no listener: plain RST


async def test_listener_close_and_stack_stop() -> None:
    with trio.fail_after(30):
        async with two_stacks() as (sa, sb, nursery):
            listener = sb.listen(B, 0)
            port = listener.address[1]
            client, _server = await _pair(sa, sb, 6005)
            await listener.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await listener.accept()
            with pytest.raises(ConnectionRefusedError):
                await sa.connect(B, port)
            nursery.cancel_scope.cancel()
        with pytest.raises(trio.BrokenResourceError, match="stack stopped"):
            await client.receive_some()


async def test_accept_any_slow_decision_absorbs_syn_retransmits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_handler(pending: PendingConnection) -> None:
        await trio.sleep(5)  # the client retransmits its SYN meanwhile (RTO 1 s, 2 s)
        if pending.local[1] == 1:
            raise RuntimeError("handler bug")  # logged; the SYN is refused
        if pending.local[1] == 2:
            return  # undecided: refused
        async with await pending.accept() as stream:
            await stream.send_all(b"late but fine")

    async with two_stacks() as (sa, sb, _):
        sb.accept_any(slow_handler)
        stream = await sa.connect("198.18.0.7", 3)
        assert await stream.receive_some() == b"late but fine"
        assert sb.counters["syn_absorbed"] >= 2
        assert sb.snapshot()["pending_syns"] == 0
        for port in (1, 2):
            with pytest.raises(ConnectionRefusedError, match=rf"198\.18\.0\.7:{port}"):
                await sa.connect("198.18.0.7", port)


async def test_corrupted_packets_dropped_and_recovered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Checksums are verified by default: a corrupted segment is dropped (counted) and
    retransmitted, never delivered."""
    seen = 0

    def corrupt_every_5th_data_packet(packet: bytes) -> bytes | None:
        nonlocal seen
        if len(packet) > 200:
            seen += 1
            if seen % 5 == 0:
                return packet[:-1] + bytes((packet[-1] ^ 0x40,))
        return packet

    async with two_stacks(tap=[corrupt_every_5th_data_packet]) as (sa, sb, _):
        client, server = await _pair(sa, sb, 6006)
        payload = bytes(range(256)) * 4000
        assert await _send_while_receiving(client, server, payload) == payload
        assert sb.counters["drop_bad_checksum"] > 0


async def test_timer_firing_while_the_writer_waits_never_acks_beyond_snd_max(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression (concurrent.yaml stall): the writer waits on a full outbound channel,
    the application queues more data, and the connection's timer (tail loss probe) fires
    before any output ran for that data. The probe must not carry bytes beyond SND.MAX:
    the peer would acknowledge them and the sender drop every such ACK, forever."""
    from norouter_trio.tcp.packets import FIN, parse_ipv4, parse_tcp

    gate = trio.Event()
    beyond: list[str] = []
    key_of: list[tuple[str, int, str, int]] = []

    async def gated(
        rx: trio.MemoryReceiveChannel[bytes], tx: trio.MemorySendChannel[bytes]
    ) -> None:
        async with rx, tx:
            async for packet in rx:
                await gate.wait()
                beyond_snd_max(packet, ack=False)
                await tx.send(packet)

    def beyond_snd_max(packet: bytes, ack: bool) -> None:
        """A's segments must lie within what A counts as sent (SND.MAX), and B's ACKs
        must be for data A has sent."""
        seg = parse_tcp(parse_ipv4(packet).payload)
        conn = sa.stack.connections.get(key_of[0]) if key_of else None
        if conn is None:
            return
        end = seg.ack if ack else seg.seq + len(seg.payload) + (1 if seg.flags & FIN else 0)
        if ((end - conn.tcp.snd_max + (1 << 31)) & 0xFFFFFFFF) - (1 << 31) > 0:
            what = "ack" if ack else f"segment {seg.seq} +{len(seg.payload)} ending"
            beyond.append(f"{what} {end} > snd_max {conn.tcp.snd_max}")

    async def b_to_a(
        rx: trio.MemoryReceiveChannel[bytes], tx: trio.MemorySendChannel[bytes]
    ) -> None:
        async with rx, tx:
            async for packet in rx:
                beyond_snd_max(packet, ack=True)
                await tx.send(packet)

    # Less than two segments (MSS 65495): after the RTO (one-segment window) the go-back-N
    # retransmission fills the gap below a probe taken from the end of the buffer.
    data = bytes(range(250)) * 400
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            a_out, a_out_rx = trio.open_memory_channel[bytes](1)
            b_out, b_out_rx = trio.open_memory_channel[bytes](64)
            a_in_tx, a_in = trio.open_memory_channel[bytes](64)
            b_in_tx, b_in = trio.open_memory_channel[bytes](64)
            sa = NetStack(A, a_out)
            sb = NetStack(B, b_out)
            nursery.start_soon(gated, a_out_rx, b_in_tx)
            nursery.start_soon(b_to_a, b_out_rx, a_in_tx)
            await nursery.start(sa.run, a_in)
            await nursery.start(sb.run, b_in)
            gate.set()
            client, server = await _pair(sa, sb, 7000)
            key_of.append((A, client.local_address[1], B, 7000))
            client.set_nodelay(True)
            gate = trio.Event()  # A's packets stop: one in the pump, one in the channel
            for small in (b"a", b"b", b"c"):  # in flight: the PTO is armed
                await client.send_all(small * 10)
                await trio.testing.wait_all_tasks_blocked()  # one packet each
            # "a" waits in the pump, "b" in the channel, the writer waits with "c".
            await client.send_all(data)  # queued: the waiting writer cannot output it
            await trio.sleep(1.0)  # the PTO (and later RTO) fire meanwhile
            gate.set()
            got = bytearray()
            await client.send_eof()
            while chunk := await server.receive_some():
                got += chunk
            assert bytes(got) == b"a" * 10 + b"b" * 10 + b"c" * 10 + data
            assert not beyond, beyond[:3]
            nursery.cancel_scope.cancel()


async def test_stalled_connection_is_reported_with_its_tcp_state(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Data in flight that nobody acknowledges (a black-holed link) is logged once, as a
    warning naming both addresses and the sequence state; `connection_report` and
    `log_report` show the same on demand."""
    from norouter_trio.tcp import netstack as ns_mod

    blackhole = False

    def tap(packet: bytes) -> bytes | None:
        return None if blackhole else packet

    with trio.fail_after(120):
        async with two_stacks(tap=[tap]) as (sa, sb, _):
            assert sa in NetStack.running() and sb in NetStack.running()
            client, server = await _pair(sa, sb, 7100)
            blackhole = True
            await client.send_all(b"z" * 5000)
            caplog.set_level(logging.DEBUG, logger="norouter_trio.tcp.netstack")
            await trio.sleep(3 * ns_mod.STALL_REPORT_AFTER)
            stalls = [
                r
                for r in caplog.records
                if "no acknowledgement" in r.getMessage() and r.levelno == logging.WARNING
            ]
            assert len(stalls) == 1, [r.getMessage() for r in stalls]
            line = stalls[0].getMessage()
            port = client.local_address[1]
            assert f"{A}:{port}<->{B}:7100 ESTABLISHED" in line
            assert "snd.una=" in line and "max=+5000" in line and "rto=+" in line
            (report,) = sa.connection_report()
            assert "sendq=5000" in report and "readers=0" in report
            sb.log_report("test")
            assert any(f"{B}:7100<->{A}:{port}" in r.getMessage() for r in caplog.records)
            server.abort()
            client.abort()
    assert sa not in NetStack.running()


async def test_one_timer_task_serves_many_connections_losing_segments(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Timers for every connection come from one task and its deadline heap: with the
    first copy of each data segment lost, every connection still recovers by its own
    retransmission timer, and the stack's task count does not grow with connections."""
    seen: set[bytes] = set()

    def drop_first_copy(packet: bytes) -> bytes | None:
        ihl = (packet[0] & 15) * 4
        payload = packet[ihl + (packet[ihl + 12] >> 4) * 4 :]
        if payload.startswith(b"msg") and payload not in seen:
            seen.add(payload)
            return None
        return packet

    with trio.fail_after(120):
        async with two_stacks(tap=[drop_first_copy]) as (sa, sb, _):
            pairs = [await _pair(sa, sb, 7200 + i) for i in range(20)]
            assert sa._nursery is not None and sb._nursery is not None
            assert len(sa._nursery.child_tasks) == len(sb._nursery.child_tasks) == 3
            got: dict[int, bytes] = {}

            async def exchange(i: int, client: TCPStream, server: TCPStream) -> None:
                await trio.sleep(i * 0.013)  # spread the deadlines apart
                await client.send_all(b"msg%03d" % i)
                got[i] = await server.receive_some()

            async with trio.open_nursery() as nursery:
                for i, (client, server) in enumerate(pairs):
                    nursery.start_soon(exchange, i, client, server)
            assert got == {i: b"msg%03d" % i for i in range(20)}
            assert len(seen) == 20  # each message was lost once, then retransmitted
            for client, server in pairs:
                await client.aclose()
                assert await server.receive_some() == b""
                await server.aclose()
            assert len(sa._nursery.child_tasks) == 3


# ---- fewer segments per connection ------------------------------------------------------

_FIN, _SYN, _ACK = 0x01, 0x02, 0x10


def _segments_from(src: str, seen: list[tuple[int, bytes]]) -> Tap:
    """A tap recording (TCP flags, payload) of every segment sent by `src`."""
    src_b = bytes(int(x) for x in src.split("."))

    def tap(packet: bytes) -> bytes:
        if packet[12:16] == src_b and packet[9] == 6:
            tcp = packet[(packet[0] & 0x0F) * 4 :]
            seen.append((tcp[13], bytes(tcp[(tcp[12] >> 4) * 4 :])))
        return packet

    return tap


async def test_initial_data_rides_on_the_handshake_ack() -> None:
    from_a: list[tuple[int, bytes]] = []
    with trio.fail_after(10):
        async with two_stacks(tap=[_segments_from(A, from_a)]) as (sa, sb, _):
            listener = sb.listen(B, 80)
            client = await sa.connect(B, 80, initial_data=b"GET / HTTP/1.0\r\n\r\n",
                                      nodelay=True)
            server = await listener.accept()
            assert await server.receive_some() == b"GET / HTTP/1.0\r\n\r\n"
            # SYN, then one segment: the handshake's ACK carrying the request.
            assert [f & (_SYN | _ACK) for f, _ in from_a] == [_SYN, _ACK]
            assert from_a[1][1] == b"GET / HTTP/1.0\r\n\r\n"
            # A full segment's payload: the peer's MSS less the options every segment has.
            assert 0 < client.segment_size <= TCPConfig().mss
            await client.aclose()
            await server.aclose()


async def test_initial_data_larger_than_the_send_buffer_is_all_sent() -> None:
    small = TCPConfig(send_buffer=16384, recv_buffer=16384)
    payload = bytes(range(256)) * 400  # 100 KiB: six send buffers
    with trio.fail_after(10):
        async with two_stacks(small) as (sa, sb, nursery):
            listener = sb.listen(B, 80)
            got: list[bytes] = []
            done = trio.Event()

            async def serve() -> None:
                server = await listener.accept()
                buf = bytearray()
                while data := await server.receive_some():
                    buf += data
                got.append(bytes(buf))
                await server.aclose()
                done.set()

            nursery.start_soon(serve)
            client = await sa.connect(B, 80, initial_data=payload)
            await client.send_eof()
            assert await client.receive_some() == b""
            await client.aclose()
            await done.wait()
            assert got == [payload]


async def test_send_last_puts_the_fin_on_the_data_and_the_reply_carries_the_ack() -> None:
    from_b: list[tuple[int, bytes]] = []
    with trio.fail_after(10):
        async with two_stacks(tap=[_segments_from(B, from_b)]) as (sa, sb, _):
            listener = sb.listen(B, 80)
            client, server = await _pair_on(sa, listener)
            server.set_nodelay(True)
            before = len(from_b)
            await client.send_all(b"question")
            assert await server.receive_some() == b"question"
            await server.send_last(b"answer")  # at once: the ACK of the question rides on it
            assert await client.receive_some() == b"answer"
            assert await client.receive_some() == b""
            answered = from_b[before:]
            assert [(f & (_FIN | _ACK), p) for f, p in answered] == [(_FIN | _ACK, b"answer")]
            with pytest.raises(trio.ClosedResourceError):
                await server.send_all(b"more")
            client.close()  # the synchronous close: FIN, as aclose()
            assert await server.receive_some() == b""
            server.close()
            server.close()  # idempotent


async def _pair_on(sa: NetStack, listener: TCPListener) -> tuple[TCPStream, TCPStream]:
    async with trio.open_nursery() as nursery:
        accepted: list[TCPStream] = []

        async def acc() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(acc)
        client = await sa.connect(B, 80)
    return client, accepted[0]


async def test_a_reply_carrying_the_delayed_ack_leaves_the_timer_no_stale_wakeup() -> None:
    """Reading a pushed segment arms a short delayed ACK, and the timer task sleeps until
    it; the reply carries the ACK, ending that deadline in an application call (no input
    follows to retime it): the timer task must then sleep until the next live deadline,
    not wake for nothing."""
    cfg = TCPConfig(pushed_ack_delay=0.01)  # well before the reply's loss probe
    with trio.fail_after(10):
        async with two_stacks(cfg) as (sa, sb, _):
            listener = sb.listen(B, 80)
            client, server = await _pair_on(sa, listener)
            await trio.testing.wait_all_tasks_blocked()
            await client.send_all(b"ping")
            assert await server.receive_some() == b"ping"
            delayed_ack = sb._timer_next
            assert delayed_ack <= trio.current_time() + 0.01
            await server.send_all(b"pong")  # carries the ACK: that deadline is gone
            live = [st.deadline for c in sb.stack.connections.values()
                    if (st := c.owner) is not None and not st.finished]
            assert min(live) > delayed_ack
            assert sb._timer_next == min(live)
            client.abort()
            server.abort()


async def _question_answer_closed(sa: NetStack, listener: TCPListener) -> None:
    """One short connection: a question, the answer with the server's FIN (B closes
    first, so B's end waits in TIME-WAIT), then both ends closed."""
    client, server = await _pair_on(sa, listener)
    await client.send_all(b"question")
    assert await server.receive_some() == b"question"
    await server.send_last(b"answer")
    assert await client.receive_some() == b"answer"
    assert await client.receive_some() == b""
    client.close()
    server.close()


async def test_receive_now_and_try_send_last_never_wait() -> None:
    """The relay's fast paths: what is there is taken at once, None / False when the
    awaited call would have to wait, and the FIN still rides on the last data."""
    from_a: list[tuple[int, bytes]] = []
    small = TCPConfig(send_buffer=16384, recv_buffer=65536)
    with trio.fail_after(10):
        async with two_stacks(small, tap=[_segments_from(A, from_a)]) as (sa, sb, _):
            client, server = await _pair_on(sa, sb.listen(B, 80))
            assert server.receive_now(100) is None  # nothing yet: the caller would wait
            await client.send_all(b"hello")
            await trio.testing.wait_all_tasks_blocked()
            assert server.receive_now(100) == b"hello"
            before = len(from_a)
            assert client.try_send_last(b"bye")
            await trio.testing.wait_all_tasks_blocked()
            assert [(f & _FIN, p) for f, p in from_a[before:]] == [(_FIN, b"bye")]
            assert server.receive_now(100) == b"bye"
            assert server.receive_now(100) == b""  # EOF, as often as asked
            assert client.try_send_last(b"")  # send_eof() twice is allowed
            assert not client.try_send_last(b"more")  # the awaited call raises instead
            with pytest.raises(trio.ClosedResourceError):
                await client.send_last(b"more")
            assert not server.try_send_last(b"x" * 20000)  # more than the buffer takes
            await server.send_last(b"x" * 20000)
            got = b""
            while data := await client.receive_some():
                got += data
            assert got == b"x" * 20000
            server.close()
            with pytest.raises(trio.ClosedResourceError):
                server.receive_now(100)


async def test_timer_sleeps_until_a_live_deadline_only() -> None:
    """After an exchange the loss-probe / RTO deadlines it armed are gone: the timer task
    must not stay set to wake for them (a scheduling pass per connection for nothing);
    TIME-WAIT ends are rounded up to one grid step for many connections."""
    from norouter_trio.tcp.netstack import TIME_WAIT_GRID

    with trio.fail_after(10):
        async with two_stacks() as (sa, sb, _):
            listener = sb.listen(B, 80)
            for _ in range(3):
                await _question_answer_closed(sa, listener)
            await trio.testing.wait_all_tasks_blocked()
            for ns in (sa, sb):
                live = [c.owner for c in ns.stack.connections.values()]
                deadlines = [st.deadline for st in live if st is not None and not st.finished]
                assert ns._timer_next == min(deadlines, default=float("inf"))
            # B closed first: its connections wait in TIME-WAIT, ending on the grid
            tw = [st.deadline for c in sb.stack.connections.values()
                  if (st := c.owner) is not None and not st.finished]
            assert len(tw) == 3
            assert all(d / TIME_WAIT_GRID == int(d / TIME_WAIT_GRID) for d in tw)


async def test_the_ack_of_a_fin_waits_for_our_fin_then_goes_alone_if_none_comes() -> None:
    """A FIN received in ESTABLISHED is ACKed by our own FIN when the application closes
    within `fin_ack_delay` (longer than one held-output pass), else by a pure ACK."""
    from_a: list[tuple[int, bytes]] = []
    sent = trio.Event()

    def tap(packet: bytes) -> bytes:
        sent.set()
        return packet

    cfg = TCPConfig(fin_ack_delay=0.3)  # well above 20 scheduling passes, even loaded
    with trio.fail_after(10):
        async with two_stacks(cfg, tap=[_segments_from(A, from_a), tap]) as (sa, sb, _):
            listener = sb.listen(B, 80)
            # The application closes a few scheduling passes after EOF: one FIN+ACK.
            client, server = await _pair_on(sa, listener)
            before = len(from_a)
            await server.send_last(b"answer")
            assert await client.receive_some() == b"answer"
            assert await client.receive_some() == b""
            for _ in range(20):  # busy a while (as a pump relaying the EOF to a socket)
                await trio.lowlevel.checkpoint()
            await client.aclose()
            assert await server.receive_some() == b""
            assert [(f & (_FIN | _ACK), p) for f, p in from_a[before:]] == [(_FIN | _ACK, b"")]
            await server.aclose()
    from_a.clear()
    cfg = TCPConfig(fin_ack_delay=0.02)
    with trio.fail_after(10):
        async with two_stacks(cfg, tap=[_segments_from(A, from_a), tap]) as (sa, sb, _):
            listener = sb.listen(B, 80)
            client, server = await _pair_on(sa, listener)
            before = len(from_a)
            await server.send_last(b"answer")
            assert await client.receive_some() == b"answer"
            assert await client.receive_some() == b""
            # The application does not close: a pure ACK at the deadline.
            while len(from_a) == before:
                sent = trio.Event()
                await sent.wait()
            assert [(f & (_FIN | _ACK), p) for f, p in from_a[before:]] == [(_ACK, b"")]
            await client.aclose()
            assert await server.receive_some() == b""
            assert [f & (_FIN | _ACK) for f, _ in from_a[before:]] == [_ACK, _FIN | _ACK]


async def test_the_request_after_connect_carries_the_handshake_ack() -> None:
    """The task woken by the SYN-ACK sends the held ACK itself with its first data."""
    from_a: list[tuple[int, bytes]] = []
    with trio.fail_after(10):
        async with two_stacks(tap=[_segments_from(A, from_a)]) as (sa, sb, _):
            listener = sb.listen(B, 80)
            client = await sa.connect(B, 80)
            await client.send_all(b"GET / HTTP/1.0\r\n\r\n")
            server = await listener.accept()
            assert await server.receive_some() == b"GET / HTTP/1.0\r\n\r\n"
            assert [(f & (_SYN | _ACK), p) for f, p in from_a] == [
                (_SYN, b""),
                (_ACK, b"GET / HTTP/1.0\r\n\r\n"),
            ]
            await client.aclose()
            await server.aclose()


async def test_a_held_ack_leaves_without_a_timer_when_the_woken_task_sends_nothing(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Time stands still (no delayed-ACK or retransmission timer can fire): the
    handshake's ACK, held for the task woken by the SYN-ACK, still leaves when that task
    sends nothing (as a client waiting for the server to speak first), a scheduling pass
    later, alone."""
    from_a: list[tuple[int, bytes]] = []
    async with two_stacks(tap=[_segments_from(A, from_a)]) as (sa, sb, nursery):
        listener = sb.listen(B, 80)
        connected = trio.Event()

        async def client_waits() -> None:
            client = await sa.connect(B, 80)
            connected.set()
            assert await client.receive_some() == b"banner"  # the server speaks first
            client.abort()

        accepted: list[TCPStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        nursery.start_soon(client_waits)
        await trio.testing.wait_all_tasks_blocked()
        assert connected.is_set()
        assert accepted, "the handshake's ACK was held for good"
        server = accepted[0]
        assert [(f & (_SYN | _ACK), p) for f, p in from_a] == [(_SYN, b""), (_ACK, b"")]
        await server.send_all(b"banner")
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == 0  # no timer did any of it
        server.abort()


async def test_ended_connections_are_freed_without_the_cycle_collector(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection that ended leaves no reference cycle (its `Delivered` and the trio
    layer's state pointed back at it): it is freed by reference counting at once, not
    piled up for the cycle collector, whose passes then stalled every connection."""
    import gc

    from norouter_trio.tcp.connection import TCPConnection
    from norouter_trio.tcp.stack import Conn

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async with two_stacks() as (sa, sb, _):
            listener = sb.listen(B, 80)
            for _ in range(5):
                await _question_answer_closed(sa, listener)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(5)  # TIME-WAIT ends (autojump clock)
            assert not sa.stack.connections and not sb.stack.connections
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, (Conn, TCPConnection))]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


class _WriterSteps(trio.abc.Instrument):
    """Counts the task steps of NetStack writers."""

    def __init__(self) -> None:
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("._writer"):
            self.count += 1


async def test_input_that_leaves_nothing_to_send_wakes_no_writer() -> None:
    """A lone pushed segment wakes the reading task, but the core delays its ACK itself
    (until the read, then at most pushed_ack_delay for an answer): nothing is held for
    the writer, so it does not run. The ACK still leaves, at the core's deadline."""
    from_b: list[tuple[int, bytes]] = []
    b_sent = [trio.Event()]

    def tap(packet: bytes) -> bytes:
        b_sent[0].set()
        return packet

    cfg = TCPConfig(pushed_ack_delay=0.01)
    with trio.fail_after(10):
        async with two_stacks(cfg, tap=[_segments_from(B, from_b), tap]) as (sa, sb, _):
            listener = sb.listen(B, 80)
            client, server = await _pair_on(sa, listener)
            await trio.testing.wait_all_tasks_blocked()
            before = len(from_b)
            steps = _WriterSteps()
            trio.lowlevel.add_instrument(steps)
            try:
                await client.send_all(b"ping")
                assert await server.receive_some() == b"ping"  # woken by it; no answer
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert steps.count == 0
            while len(from_b) == before:  # the ACK, at the delayed-ACK deadline
                b_sent[0] = trio.Event()
                await b_sent[0].wait()
            assert [(f & (_FIN | _ACK), p) for f, p in from_b[before:]] == [(_ACK, b"")]
            client.abort()
            server.abort()


async def test_the_peers_fin_after_ours_is_acked_without_a_writer_pass() -> None:
    """Our FIN went first; the peer's FIN wakes our reader (EOF) and needs an ACK at once.
    Nothing we could send can carry it any more, so it is not held for the woken task:
    it leaves at once and the writer does not run."""
    from_b: list[tuple[int, bytes]] = []
    with trio.fail_after(10):
        async with two_stacks(tap=[_segments_from(B, from_b)]) as (sa, sb, nursery):
            listener = sb.listen(B, 80)
            client, server = await _pair_on(sa, listener)
            await server.send_last(b"answer")  # B closes first
            assert await client.receive_some() == b"answer"
            assert await client.receive_some() == b""
            got_eof = trio.Event()

            async def read_eof() -> None:
                assert await server.receive_some() == b""  # parked until A's FIN
                got_eof.set()

            nursery.start_soon(read_eof)
            await trio.testing.wait_all_tasks_blocked()
            before = len(from_b)
            steps = _WriterSteps()
            trio.lowlevel.add_instrument(steps)
            try:
                await client.send_eof()
                await got_eof.wait()
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert [(f & (_FIN | _ACK), p) for f, p in from_b[before:]] == [(_ACK, b"")]
            assert steps.count == 0
            client.close()
            server.close()


async def test_time_wait_ends_due_together_are_fired_a_batch_per_slice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """TIME-WAIT ends share a grid step, so many come due at once: they are fired at most
    TIMER_BATCH per scheduling slice (one slice for all held every other connection up
    for a millisecond or more), and every one of them still ends."""
    from norouter_trio.tcp.netstack import TIME_WAIT_GRID, TIMER_BATCH

    n = 3 * TIMER_BATCH + 5
    async with two_stacks() as (sa, sb, _):
        listener = sb.listen(B, 80)
        for _ in range(n):
            client, server = await _pair_on(sa, listener)
            await server.send_last(b"bye")  # B closes first: B ends in TIME-WAIT
            assert await client.receive_some() == b"bye"
            assert await client.receive_some() == b""
            client.close()
            server.close()
        await trio.testing.wait_all_tasks_blocked()
        waiting = [c for c in sb.stack.connections.values()
                   if c.tcp.state is TCPState.TIME_WAIT]
        assert len(waiting) == n
        assert len({c.owner.deadline for c in waiting}) == 1  # one grid step (frozen clock)

        # Which task step forgot each connection: count them per step.
        per_step: dict[int, int] = {}
        step = [0]

        class Steps(trio.abc.Instrument):
            def before_task_step(self, task: trio.lowlevel.Task) -> None:
                step[0] += 1

        forget = sb.stack.forget

        def counting_forget(conn: Any) -> None:
            per_step[step[0]] = per_step.get(step[0], 0) + 1
            forget(conn)

        sb.stack.forget = counting_forget  # type: ignore[method-assign]
        trio.lowlevel.add_instrument(Steps())
        with trio.fail_after(5):
            while sb.stack.connections:
                await trio.sleep(TIME_WAIT_GRID)
        assert sum(per_step.values()) == n
        assert max(per_step.values()) <= TIMER_BATCH
        assert len(per_step) >= 4
