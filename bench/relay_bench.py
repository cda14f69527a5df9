"""What the debug relay costs the switch, and whether a stalled browser slows it down.

A switch loop (the `SyntheticManager`, which counts like the manager and calls observers)
pushes pre-built IPv4/TCP packets (60 flows, 1400-byte data + 40-byte ACKs) as fast as it
can, yielding to trio every 64 frames as a manager reading agent stdout would. Cases:

  no relay            counters only (the manager without --relay)
  relay, no client    the relay's observer on the packet path, nobody watching
  relay, 1 client     plus one websocket client reading everything (same process)
  relay, 1 + stalled  plus a client that completed the handshake and never reads

Then the same with a real `Manager` and fake agents (one pumps 1400-byte frames to the other,
which counts them): no relay, an observer whose frame_switched does nothing (the manager's
per-frame observed path alone), the relay, and the relay with a stalled client. First, the
CPU time of one `frame_switched` call, which is robust on a loaded machine.

Usage: python bench/relay_bench.py [--seconds 3] [--frames 200000]
Numbers are frames/s of the switch loop; the machine may be shared, so compare the rows of
one run rather than across runs.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from norouter_trio.relay.server import Relay, RelayConfig, run_relay
from norouter_trio.relay.synthetic import SyntheticManager, conversations

HOSTS = {f"h{i}": f"127.0.42.{100 + i}" for i in range(4)}


def build_packets(manager: SyntheticManager) -> list[tuple[str, str, bytes]]:
    packets: list[tuple[str, str, bytes]] = []
    convs = list(conversations(manager, 60))
    for c in convs:
        packets += c.handshake()
    for _ in range(40):
        for c in convs:
            packets += c.data(1400)
    return packets


async def switch_loop(manager: SyntheticManager, packets: list[tuple[str, str, bytes]],
                      seconds: float) -> float:
    switch = manager.switch
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for i in range(0, len(packets), 64):
            for src, dst, p in packets[i:i + 64]:
                switch(src, dst, p)
            n += len(packets[i:i + 64])
            await trio.sleep(0)
        if time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start)


async def reader(url: str, stop: trio.Event, counts: dict[str, int]) -> None:
    try:
        async with open_websocket_url(url) as ws:
            while not stop.is_set():
                msg = await ws.get_message()
                counts["messages"] += 1
                counts["bytes"] += len(msg)
    except ConnectionClosed:
        pass


def stalled(port: int, token: str) -> socket.socket:
    """A websocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    return sock


async def run_case(name: str, seconds: float, *, relay_on: bool, clients: int,
                   stall: bool) -> tuple[str, float, str]:
    manager = SyntheticManager(HOSTS)
    packets = build_packets(manager)
    note = ""
    async with trio.open_nursery() as nursery:
        relay: Relay | None = None
        if relay_on:
            relay = await nursery.start(partial(run_relay, manager, None, config=RelayConfig()))
        manager.start_all()
        stop = trio.Event()
        counts = {"messages": 0, "bytes": 0}
        sock = None
        if relay is not None:
            url = f"ws://127.0.0.1:{relay.port}/ws?token={relay.token}"
            for _ in range(clients):
                nursery.start_soon(reader, url, stop, counts)
            if stall:
                sock = stalled(relay.port, relay.token)
            await trio.sleep(0.3)
        rate = await switch_loop(manager, packets, seconds)
        if relay is not None:
            note = (f"client got {counts['messages']} msgs/{counts['bytes'] // 1024} KiB; "
                    f"dropped clients {relay.clients_dropped}; "
                    f"log not_logged {relay.observer.log.not_logged}")
        stop.set()
        if sock is not None:
            sock.close()
        nursery.cancel_scope.cancel()
    return name, rate, note


FAKE_AGENT = Path(__file__).resolve().parent.parent / "tests" / "fake_agent.py"


async def run_manager_case(name: str, count: int, *, relay_on: bool, stall: bool,
                           noop: bool = False) -> tuple[str, float, str]:
    """A real Manager: one fake agent pumps `count` 1400-byte frames, another sinks them."""
    from norouter_trio.manager import Manager
    from norouter_trio.manifest import load_manifest

    py, fake = json.dumps(sys.executable), json.dumps(str(FAKE_AGENT))
    manifest = load_manifest(
        "hosts:\n"
        f"  pump:\n    vip: \"127.0.42.221\"\n"
        f"    cmd: [{py}, {fake}, \"--pump\", \"127.0.42.222\", "
        f"\"--size\", \"1400\", \"--count\", \"{count}\"]\n"
        f"  sink:\n    vip: \"127.0.42.222\"\n    cmd: [{py}, {fake}, \"--sink\", \"{count}\", "
        f"\"--size\", \"1400\"]\n")
    manager = Manager(manifest, grace=1.0)
    if noop:
        from norouter_trio.manager import Observer

        class NoopPacketObserver(Observer):
            """Takes the manager's per-frame (observed) path, then does nothing."""

            def frame_switched(self, src_host: Any, dst_host: Any, packet: bytes) -> None:
                pass

        manager.add_observer(NoopPacketObserver())
    note = ""
    sock = None
    async with trio.open_nursery() as nursery:
        relay: Relay | None = None
        if relay_on:
            relay = await nursery.start(partial(run_relay, manager, None))
            if stall:
                sock = stalled(relay.port, relay.token)
        await nursery.start(manager.run)
        sink = manager.host("sink")
        with trio.fail_after(120):
            while not any(line.startswith("sink ") for line in sink.last_stderr):
                await trio.sleep(0.1)
        line = next(x for x in sink.last_stderr if x.startswith("sink "))
        _, frames, _, secs = line.split()
        rate = int(frames) / max(1e-6, float(secs))
        drops = manager.host("sink").drops
        note = f"{frames} frames delivered; drops {dict(drops) or 0}"
        if relay is not None:
            note += f"; dropped clients {relay.clients_dropped}"
        if sock is not None:
            sock.close()
        manager.stop()
        await manager.done.wait()
        nursery.cancel_scope.cancel()
    return name, rate, note


def observer_cpu() -> list[tuple[str, float]]:
    """CPU time per frame of the observer call alone (best of 5; robust on a loaded box)."""
    from norouter_trio.relay.observer import RelayObserver

    packets = build_packets(SyntheticManager(HOSTS))

    def per_frame(fn: object) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.process_time()
            for src, dst, p in packets:
                fn(src, dst, p)  # type: ignore[operator]
            best = min(best, (time.process_time() - t) / len(packets))
        return best * 1e6

    return [("empty call", per_frame(lambda s, d, p: None)),
            ("RelayObserver.frame_switched", per_frame(RelayObserver().frame_switched))]


async def main(seconds: float, count: int) -> None:
    print("Observer cost per frame (CPU time, 60 TCP flows, 1400-byte data + ACKs)")
    for name, us in observer_cpu():
        print(f"  {name:<30} {us:6.2f} us")
    print()
    cases = [
        ("no relay", dict(relay_on=False, clients=0, stall=False)),
        ("relay, no client", dict(relay_on=True, clients=0, stall=False)),
        ("relay, 1 client", dict(relay_on=True, clients=1, stall=False)),
        ("relay, 1 + stalled", dict(relay_on=True, clients=1, stall=True)),
    ]
    rows = [await run_case(name, seconds, **kw) for name, kw in cases]  # type: ignore[arg-type]
    base = rows[0][1]
    print(f"{'case':<20} {'frames/s':>12} {'vs no relay':>12}  notes")
    for name, rate, note in rows:
        print(f"{name:<20} {rate:>12,.0f} {rate / base:>11.0%}  {note}")
    print()
    print("Real Manager, fake agents (tests/fake_agent.py pump -> sink, non-TCP 1400-byte frames)")
    mcases = [("no relay", dict(relay_on=False, stall=False)),
              ("no-op frame observer", dict(relay_on=False, stall=False, noop=True)),
              ("relay, no client", dict(relay_on=True, stall=False)),
              ("relay + stalled", dict(relay_on=True, stall=True))]
    mrows = [await run_manager_case(name, count, **kw)  # type: ignore[arg-type]
             for name, kw in mcases]
    base = mrows[0][1]
    print(f"{'case':<20} {'frames/s':>12} {'vs no relay':>12}  notes")
    for name, rate, note in mrows:
        print(f"{name:<20} {rate:>12,.0f} {rate / base:>11.0%}  {note}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--frames", type=int, default=200_000, help="frames in the manager case")
    args = ap.parse_args()
    trio.run(main, args.seconds, args.frames)
