"""Conformance of our TCP stack against Linux TCP, through a TUN device in a namespace.

The kernel is the reference peer (tests/tunbridge.py). Every behaviour is checked in both
directions: kernel client -> our listener, and our client -> kernel listener.

The first tests check the bridge against the kernel alone with hand-built packets, so a
bridge fault is never blamed on the stack. Bulk transfers move 64 MiB each way; the lossy
ones (drop 2 %, duplicate 1 %, reorder 3 %, in both directions so ACKs suffer too) move
8 MiB to keep this file to a few minutes, at the 65535 MTU (few big segments), at 1500
(thousands of segments, so recovery runs often) and with 5 ms added each way. On failure
the last packets crossing the bridge are printed (pytest shows them with the failure).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
import tun_packets as tp
from tun_peer import payload
from tunbridge import FROM_KERNEL, TO_KERNEL, FaultInjector, Faults, TunBridge, open_tun_bridge

if TYPE_CHECKING:
    from norouter_trio.tcp.netstack import NetStack, TCPStream

PORT = 5001
BULK = 64 << 20
LOSSY_BULK = 8 << 20
PROBE_GAP = 0.15
# The seed is one whose first 60 decisions in each direction include every fault, so even
# the 65535-MTU runs (about 130 data packets, 80 ACKs) see drops, duplicates and reorders.
LOSSY = Faults(drop=0.02, duplicate=0.01, reorder=0.03, reorder_after=3, seed=20240631)
LOSSY_DELAYED = dataclasses.replace(LOSSY, delay=0.005)  # a 10 ms RTT for the RTO to learn


# --- the fault injector alone (sans-IO) ---------------------------------------------------

def test_faults_are_reproducible_and_happen() -> None:
    packets = [i.to_bytes(4, "big") for i in range(5000)]

    def run(seed: int) -> tuple[list[bytes], dict[str, int]]:
        inj = FaultInjector(Faults(drop=0.02, duplicate=0.01, reorder=0.02, seed=seed), "x")
        out = [p for i, pkt in enumerate(packets) for p in inj.feed(pkt, float(i))]
        out += inj.poll(1e9)
        return out, inj.counters

    first, counters = run(1)
    assert (first, counters) == run(1)
    assert first != run(2)[0]
    assert counters["dropped"] > 50 and counters["duplicated"] > 20
    assert counters["reordered"] > 50
    assert len(first) == len(packets) - counters["dropped"] + counters["duplicated"]
    assert set(first) <= set(packets)
    assert first != sorted(first)


def test_reordered_packet_released_after_k_or_hold_max() -> None:
    inj = FaultInjector(Faults(reorder=1.0, reorder_after=2, hold_max=0.5), "x")
    assert inj.feed(b"a", 0.0) == []
    assert inj.next_deadline() == 0.5
    inj.faults = Faults(reorder=0.0, reorder_after=2)
    assert inj.feed(b"b", 0.1) == [b"b"]
    assert inj.feed(b"c", 0.2) == [b"c", b"a"]
    inj.faults = Faults(reorder=1.0, reorder_after=2, hold_max=0.5)
    assert inj.feed(b"d", 1.0) == []
    assert inj.poll(1.4) == []
    assert inj.poll(1.5) == [b"d"]
    assert inj.next_deadline() is None


def test_lossy_seed_faults_early_in_both_directions() -> None:
    """The LOSSY seed injects every fault within 60 packets each way (see LOSSY)."""
    for direction in (TO_KERNEL, FROM_KERNEL):
        inj = FaultInjector(LOSSY, direction)
        for i in range(60):
            inj.feed(bytes([i]), 0.0)
        assert all(n > 0 for n in inj.counters.values()), (direction, inj.counters)


def test_delay_holds_every_packet() -> None:
    inj = FaultInjector(Faults(delay=0.25), "x")
    assert inj.feed(b"a", 1.0) == []
    assert inj.next_deadline() == 1.25
    assert inj.poll(1.2) == []
    assert inj.poll(1.25) == [b"a"]


# --- the bridge against the kernel alone ---------------------------------------------------

@pytest.mark.netns
async def test_bridge_kernel_answers_syn() -> None:
    """A hand-built SYN to a listening port gets SYN-ACK; to a closed port, RST."""
    with trio.fail_after(30):
        async with open_tun_bridge() as br, \
                br.open_peer("--listen", f"{br.kernel_ip}:0", "recv") as peer:
            port = int((await peer.expect("listening"))[1])
            for dport, want in ((port, tp.SYN | tp.ACK), (9, tp.RST | tp.ACK)):
                await br.to_kernel.send(tp.build_tcp(br.vip, br.kernel_ip, 40000, dport,
                                                     1000, 0, tp.SYN, mss=1460))
                reply = tp.parse_tcp(await br.from_kernel.receive(), verify=True)
                assert reply is not None, br.format_trace()
                assert (reply.src, reply.sport, reply.dst, reply.dport) == \
                    (br.kernel_ip, dport, br.vip, 40000)
                assert reply.flags == want and reply.ack == 1001
                assert reply.checksum_ok, "the TUN must hand us complete checksums"


@pytest.mark.netns
async def test_bridge_carries_kernel_syn_to_vip() -> None:
    """The kernel routes our VIP to the TUN; a hand-built RST makes its connect fail."""
    with trio.fail_after(30):
        async with open_tun_bridge() as br, \
                br.open_peer("--connect", f"{br.vip}:80") as peer:
            syn = tp.parse_tcp(await br.from_kernel.receive(), verify=True)
            assert syn is not None and syn.flags == tp.SYN, br.format_trace()
            assert (syn.src, syn.dst, syn.dport) == (br.kernel_ip, br.vip, 80)
            assert syn.mss == br.mtu - 40 and syn.checksum_ok
            await br.to_kernel.send(tp.build_tcp(br.vip, br.kernel_ip, 80, syn.sport, 0,
                                                 syn.seq + 1, tp.RST | tp.ACK, window=0))
            await peer.expect("refused")


# --- our stack against the kernel ----------------------------------------------------------

@asynccontextmanager
async def stack_vs_kernel(*, faults: Faults | None = None,
                          mtu: int = 65535) -> AsyncIterator[tuple[TunBridge, NetStack]]:
    """A bridge plus a running NetStack on its VIP; prints the packet trace on failure."""
    from norouter_trio.tcp.netstack import NetStack

    async with open_tun_bridge(mtu=mtu, to_kernel_faults=faults,
                               from_kernel_faults=faults) as br:
        stack = NetStack(br.vip, br.to_kernel)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(stack.run, br.from_kernel)
                yield br, stack
                nursery.cancel_scope.cancel()
            assert not br.problems, f"our stack sent malformed packets: {br.problems}"
            assert br.counters[FROM_KERNEL]["oversize"] == 0, "the TUN delivered GSO packets"
        except BaseException:
            print(f"--- bridge counters {br.counters} faults {br.fault_counters()}")
            print(f"--- stack counters {getattr(stack, 'counters', None)}")
            print("--- last packets through the bridge\n" + br.format_trace(300))
            raise


def after(gap: float) -> Callable[[tp.TCPInfo], bool]:
    """Matches any packet `gap` seconds or more after now.

    After a zero window is seen, only the persist timer makes a sender transmit again;
    segments already in flight cross the bridge within milliseconds, while a window probe
    waits at least one RTO (>= 200 ms on Linux, >= 1 s in RFC 6298), so a packet this late
    is a probe.
    """
    start = trio.current_time()
    return lambda _p: trio.current_time() - start >= gap


async def read_to_eof(stream: TCPStream) -> tuple[int, str]:
    digest, count = hashlib.sha256(), 0
    while data := await stream.receive_some(1 << 20):
        digest.update(data)
        count += len(data)
    return count, digest.hexdigest()


async def send_data(stream: TCPStream, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(data), 1 << 20):
        await stream.send_all(view[i:i + (1 << 20)])


def digest_of(n: int, seed: int) -> list[str]:
    return [str(n), hashlib.sha256(payload(n, seed)).hexdigest()]


@pytest.mark.netns
async def test_handshake_kernel_client() -> None:
    with trio.fail_after(30):
        async with stack_vs_kernel() as (br, stack):
            listener = stack.listen(br.vip, PORT)
            syn_ack = br.watch(TO_KERNEL, lambda p: p.flags == tp.SYN | tp.ACK, "SYN-ACK")
            async with br.open_peer("--connect", f"{br.vip}:{PORT}",
                                    "send:5:1", "recvn:5", "close") as peer:
                stream = await listener.accept()
                _, local, remote = await peer.expect("connected")
                assert remote == f"{br.vip}:{PORT}"
                assert stream.local_address == (br.vip, PORT)
                assert f"{stream.remote_address[0]}:{stream.remote_address[1]}" == local
                assert await stream.receive_some(100) == payload(5, 1)
                await stream.send_all(b"hello")
                await peer.expect("sent")
                assert (await peer.expect("received"))[1:3] == \
                    ["5", hashlib.sha256(b"hello").hexdigest()]
            info = await syn_ack.wait(1)
            assert info.mss is not None and 536 < info.mss <= 65495, info.summary()
            await stream.aclose()


@pytest.mark.netns
async def test_handshake_stack_client() -> None:
    with trio.fail_after(30):
        async with stack_vs_kernel() as (br, stack), \
                br.open_peer("--listen", f"{br.kernel_ip}:0", "recvn:5", "send:5:2",
                             "recv") as peer:
            port = int((await peer.expect("listening"))[1])
            syn = br.watch(TO_KERNEL, lambda p: p.flags == tp.SYN, "SYN")
            stream = await stack.connect(br.kernel_ip, port)
            _, local, remote = await peer.expect("connected")
            assert stream.remote_address == (br.kernel_ip, port)
            assert stream.local_address[0] == br.vip
            assert remote == f"{br.vip}:{stream.local_address[1]}" and local.endswith(f":{port}")
            await stream.send_all(b"12345")
            assert (await peer.expect("received"))[1:3] == \
                ["5", hashlib.sha256(b"12345").hexdigest()]
            assert await stream.receive_some(100) == payload(5, 2)
            await stream.aclose()
            await peer.expect("sent")
            assert (await peer.expect("received"))[1] == "0"
            info = await syn.wait(1)
            assert info.mss is not None and 536 < info.mss <= 65495, info.summary()


async def kernel_to_stack(br: TunBridge, stack: NetStack, size: int, seed: int) -> None:
    """The kernel sends `size` bytes then FIN; we check every byte and close."""
    listener = stack.listen(br.vip, PORT)
    async with br.open_peer("--connect", f"{br.vip}:{PORT}", f"send:{size}:{seed}", "shut",
                            "recv") as peer:
        stream = await listener.accept()
        assert await read_to_eof(stream) == (size, digest_of(size, seed)[1])
        await stream.aclose()
        await peer.expect("connected")
        await peer.expect("sent")
        await peer.expect("shut")
        assert (await peer.expect("received"))[1] == "0"
        await peer.expect("done")


async def stack_to_kernel(br: TunBridge, stack: NetStack, size: int, seed: int) -> None:
    """We send `size` bytes then FIN; the kernel checks every byte, then closes."""
    async with br.open_peer("--listen", f"{br.kernel_ip}:0", "recv", "close") as peer:
        port = int((await peer.expect("listening"))[1])
        stream = await stack.connect(br.kernel_ip, port)
        await send_data(stream, payload(size, seed))
        await stream.send_eof()
        await peer.expect("connected")
        assert (await peer.expect("received"))[1:3] == digest_of(size, seed)
        assert await stream.receive_some(100) == b""
        await stream.aclose()
        await peer.expect("closed")


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("direction", ["kernel_to_stack", "stack_to_kernel"])
async def test_bulk_64mib(direction: str) -> None:
    with trio.fail_after(120):
        async with stack_vs_kernel() as (br, stack):
            transfer = kernel_to_stack if direction == "kernel_to_stack" else stack_to_kernel
            await transfer(br, stack, BULK, 64)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize(("mtu", "faults"), [(65535, LOSSY), (1500, LOSSY),
                                             (65535, LOSSY_DELAYED)],
                         ids=["mtu65535", "mtu1500", "mtu65535-delay5ms"])
@pytest.mark.parametrize("direction", ["kernel_to_stack", "stack_to_kernel"])
async def test_bulk_lossy(direction: str, mtu: int, faults: Faults) -> None:
    """8 MiB with 2 % drop, 1 % duplicate, 3 % reorder both ways: intact, and it finishes."""
    with trio.fail_after(120):
        async with stack_vs_kernel(faults=faults, mtu=mtu) as (br, stack):
            transfer = kernel_to_stack if direction == "kernel_to_stack" else stack_to_kernel
            await transfer(br, stack, LOSSY_BULK, 8)
            injected = br.fault_counters()
            assert all(n > 0 for counts in injected.values() for n in counts.values()), \
                f"the bridge injected too few faults to test anything: {injected}"


async def our_duplex(stream: TCPStream, size: int, seed: int) -> tuple[int, str]:
    """Send `size` bytes then FIN while reading to EOF; what we read."""
    got: list[tuple[int, str]] = []

    async def sender() -> None:
        await send_data(stream, payload(size, seed))
        await stream.send_eof()

    async def receiver() -> None:
        got.append(await read_to_eof(stream))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)
    return got[0]


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("faults", [None, LOSSY], ids=["lossless", "lossy"])
@pytest.mark.parametrize("opener", ["kernel", "stack"])
async def test_duplex_bulk(opener: str, faults: Faults | None) -> None:
    """8 MiB each way at once on one connection: data and ACKs share segments."""
    size = 8 << 20
    with trio.fail_after(120):
        async with stack_vs_kernel(faults=faults) as (br, stack):
            if opener == "kernel":
                listener = stack.listen(br.vip, PORT)
                async with br.open_peer("--connect", f"{br.vip}:{PORT}",
                                        f"duplex:{size}:11", "close") as peer:
                    stream = await listener.accept()
                    assert await our_duplex(stream, size, 12) == \
                        (size, digest_of(size, 11)[1])
                    await peer.expect("connected")
                    assert (await peer.expect("duplex"))[1:] == \
                        [str(size), *digest_of(size, 12)]
                    await peer.expect("closed")
            else:
                async with br.open_peer("--listen", f"{br.kernel_ip}:0", f"duplex:{size}:11",
                                        "close") as peer:
                    port = int((await peer.expect("listening"))[1])
                    stream = await stack.connect(br.kernel_ip, port)
                    assert await our_duplex(stream, size, 12) == \
                        (size, digest_of(size, 11)[1])
                    await peer.expect("connected")
                    assert (await peer.expect("duplex"))[1:] == \
                        [str(size), *digest_of(size, 12)]
                    await peer.expect("closed")
            await stream.aclose()


@pytest.mark.netns
async def test_many_connections_both_roles() -> None:
    """Six kernel clients on our echo listener and six of our clients on kernel listeners,
    all at once (1 MiB each way per connection): demultiplexing by 4-tuple."""
    size, count = 1 << 20, 6
    with trio.fail_after(90):
        async with stack_vs_kernel() as (br, stack):
            listener = stack.listen(br.vip, PORT)

            async def echo(stream: TCPStream) -> None:
                while data := await stream.receive_some(1 << 20):
                    await stream.send_all(data)
                await stream.send_eof()
                await stream.aclose()

            async def kernel_client(i: int) -> None:
                async with br.open_peer("--connect", f"{br.vip}:{PORT}",
                                        f"duplex:{size}:{100 + i}") as peer:
                    await peer.expect("connected")
                    assert (await peer.expect("duplex"))[1:] == \
                        [str(size), *digest_of(size, 100 + i)]

            async def our_client(i: int) -> None:
                async with br.open_peer("--listen", f"{br.kernel_ip}:0",
                                        f"duplex:{size}:{200 + i}") as peer:
                    port = int((await peer.expect("listening"))[1])
                    stream = await stack.connect(br.kernel_ip, port)
                    assert await our_duplex(stream, size, 300 + i) == \
                        (size, digest_of(size, 200 + i)[1])
                    await peer.expect("connected")
                    assert (await peer.expect("duplex"))[1:] == \
                        [str(size), *digest_of(size, 300 + i)]
                    await stream.aclose()

            async with trio.open_nursery() as servers:
                async def accept_all() -> None:
                    for _ in range(count):
                        servers.start_soon(echo, await listener.accept())
                servers.start_soon(accept_all)
                async with trio.open_nursery() as clients:
                    for i in range(count):
                        clients.start_soon(kernel_client, i)
                        clients.start_soon(our_client, i)


@pytest.mark.netns
async def test_half_close_kernel_first() -> None:
    """The kernel sends then FINs; we read to EOF and only then answer; it still receives."""
    with trio.fail_after(30):
        async with stack_vs_kernel() as (br, stack):
            listener = stack.listen(br.vip, PORT)
            async with br.open_peer("--connect", f"{br.vip}:{PORT}", "send:1000:3", "shut",
                                    "recv") as peer:
                stream = await listener.accept()
                assert await read_to_eof(stream) == (1000, digest_of(1000, 3)[1])
                await peer.expect("connected")
                await peer.expect("sent")
                await peer.expect("shut")
                await send_data(stream, payload(200_000, 4))
                await stream.send_eof()
                assert (await peer.expect("received"))[1:3] == digest_of(200_000, 4)
                await peer.expect("done")
                await stream.aclose()


@pytest.mark.netns
async def test_half_close_stack_first() -> None:
    """We send then FIN; the kernel reads to EOF, then answers; we still receive it all."""
    with trio.fail_after(30):
        async with stack_vs_kernel() as (br, stack), \
                br.open_peer("--listen", f"{br.kernel_ip}:0", "recv", "send:300000:5",
                             "close") as peer:
            port = int((await peer.expect("listening"))[1])
            stream = await stack.connect(br.kernel_ip, port)
            await send_data(stream, payload(1000, 6))
            await stream.send_eof()
            await peer.expect("connected")
            assert (await peer.expect("received"))[1:3] == digest_of(1000, 6)
            assert await read_to_eof(stream) == (300_000, digest_of(300_000, 5)[1])
            await peer.expect("sent")
            await peer.expect("closed")
            await stream.aclose()


@pytest.mark.netns
async def test_rst_from_stack_for_closed_port() -> None:
    with trio.fail_after(30):
        async with stack_vs_kernel() as (br, _stack):
            rst = br.watch(TO_KERNEL, lambda p: bool(p.flags & tp.RST) and p.sport == 9, "RST")
            async with br.open_peer("--connect", f"{br.vip}:9") as peer:
                await peer.expect("refused")
            info = await rst.wait(1)
            assert info.dst == br.kernel_ip


@pytest.mark.netns
async def test_rst_from_kernel_for_closed_port() -> None:
    with trio.fail_after(30):
        async with stack_vs_kernel() as (br, stack):
            rst = br.watch(FROM_KERNEL, lambda p: bool(p.flags & tp.RST), "RST")
            with pytest.raises(ConnectionRefusedError):
                await stack.connect(br.kernel_ip, 9)
            assert (await rst.wait(1)).sport == 9


@pytest.mark.netns
async def test_kernel_reset_breaks_our_stream() -> None:
    """A RST on an established connection surfaces as BrokenResourceError, both calls."""
    with trio.fail_after(30):
        async with stack_vs_kernel() as (br, stack), \
                br.open_peer("--listen", f"{br.kernel_ip}:0", "recvn:5", "abort") as peer:
            port = int((await peer.expect("listening"))[1])
            rst = br.watch(FROM_KERNEL, lambda p: bool(p.flags & tp.RST), "RST")
            stream = await stack.connect(br.kernel_ip, port)
            await stream.send_all(b"12345")
            await peer.expect("connected")
            await peer.expect("received")
            await peer.expect("aborted")
            await rst.wait(5)
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(100)
            with pytest.raises(trio.BrokenResourceError):
                await send_data(stream, b"after the reset")
            await stream.aclose()


@pytest.mark.netns
async def test_zero_window_kernel_stops_reading() -> None:
    """The kernel stops reading: it advertises 0, we probe (RFC 9293 MUST), it resumes."""
    size = 8 << 20
    with trio.fail_after(60):
        async with stack_vs_kernel() as (br, stack), \
                br.open_peer("--listen", f"{br.kernel_ip}:0", "--rcvbuf", "65536", "wait",
                             "recv", "close") as peer:
            port = int((await peer.expect("listening"))[1])
            zero = br.watch(FROM_KERNEL, lambda p: p.window == 0 and p.flags & tp.ACK != 0,
                            "advertising a zero window")
            stream = await stack.connect(br.kernel_ip, port)
            await peer.expect("connected")
            await peer.expect("waiting")
            async with trio.open_nursery() as nursery:
                async def sender() -> None:
                    await send_data(stream, payload(size, 9))
                    await stream.send_eof()
                nursery.start_soon(sender)
                await zero.wait(20)
                probe = br.watch(TO_KERNEL, after(PROBE_GAP), "probing the zero window")
                await probe.wait(10)
                answer = br.watch(FROM_KERNEL, lambda p: p.window == 0,
                                  "answering our probe with a zero window")
                await answer.wait(10)
                await peer.tell("go")
                await peer.expect("resumed")
                assert (await peer.expect("received"))[1:3] == digest_of(size, 9)
            assert await stream.receive_some(100) == b""
            await stream.aclose()


@pytest.mark.netns
async def test_zero_window_stack_stops_reading() -> None:
    """We stop reading: we advertise 0, the kernel probes, we answer; reading resumes it."""
    size = 8 << 20
    with trio.fail_after(60):
        async with stack_vs_kernel() as (br, stack):
            listener = stack.listen(br.vip, PORT)
            zero = br.watch(TO_KERNEL, lambda p: p.window == 0 and p.flags & tp.ACK != 0,
                            "advertising a zero window")
            async with br.open_peer("--connect", f"{br.vip}:{PORT}", f"send:{size}:10",
                                    "shut", "recv") as peer:
                stream = await listener.accept()
                await zero.wait(20)
                probe = br.watch(FROM_KERNEL, after(PROBE_GAP), "probing the zero window")
                await probe.wait(10)
                answer = br.watch(TO_KERNEL, lambda p: p.window == 0,
                                  "answering a probe with a zero window")
                await answer.wait(10)
                assert await read_to_eof(stream) == (size, digest_of(size, 10)[1])
                await stream.aclose()
                await peer.expect("connected")
                await peer.expect("sent")
                await peer.expect("shut")
                assert (await peer.expect("received"))[1] == "0"

