"""Benchmark of the user-space TCP stack: two NetStacks in one process, joined by memory
channels (the same shape the agent uses, minus stdio framing).

    python bench/stack_bench.py [--mb 64] [--conns 16] [--churn 3000] [--idle 1000]
                                [--workers 16] [--profile bulk|churn] [--count]

Prints bulk MB/s for one connection (receive-side checksum verification off, then on),
for 16 connections at once, connection set-ups + tear-downs per second, and memory per
idle established connection (tracemalloc, both endpoints counted separately).
`--count` instead prints, per set-up + tear-down, the trio task steps (by task), I/O
waits and Python function calls: figures that, unlike conn/s, do not depend on the load.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from norouter_trio.tcp import checksum
from norouter_trio.tcp.connection import TCPConfig
from norouter_trio.tcp.netstack import NetStack, TCPStream

A, B = "127.0.42.101", "127.0.42.102"
CHANNEL = 64  # packets per channel, as the agent's stdio channels
CHUNK = 256 * 1024


async def _pipe(rx: trio.MemoryReceiveChannel[bytes], tx: trio.MemorySendChannel[bytes]) -> None:
    async with rx, tx:
        async for packet in rx:
            await tx.send(packet)


@asynccontextmanager
async def pair(
    verify: bool, config: TCPConfig | None = None
) -> AsyncIterator[tuple[NetStack, NetStack]]:
    async with trio.open_nursery() as nursery:
        a_out, a_rx = trio.open_memory_channel[bytes](CHANNEL)
        b_out, b_rx = trio.open_memory_channel[bytes](CHANNEL)
        sa = NetStack(A, a_out, verify_checksums=verify, config=config)
        sb = NetStack(B, b_out, verify_checksums=verify, config=config)
        # A's outbound channel is B's inbound and vice versa (no pump task in between).
        await nursery.start(sa.run, b_rx)
        await nursery.start(sb.run, a_rx)
        yield sa, sb
        nursery.cancel_scope.cancel()


async def _connected(
    sa: NetStack, sb: NetStack, port: int, n: int
) -> list[tuple[TCPStream, TCPStream]]:
    listener = sb.listen(B, port, backlog=max(128, n))
    out: list[tuple[TCPStream, TCPStream]] = []
    for _ in range(n):
        async with trio.open_nursery() as nursery:
            box: list[TCPStream] = []

            async def acc(box: list[TCPStream] = box) -> None:
                box.append(await listener.accept())

            nursery.start_soon(acc)
            client = await sa.connect(B, port)
        out.append((client, box[0]))
    await listener.aclose()
    return out


async def bulk(nbytes: int, conns: int, verify: bool) -> float:
    """MB/s moving `nbytes` in total A→B over `conns` connections."""
    async with pair(verify) as (sa, sb):
        streams = await _connected(sa, sb, 5001, conns)
        block = os.urandom(CHUNK)
        per = nbytes // conns

        async def send(s: TCPStream) -> None:
            left = per
            while left > 0:
                await s.send_all(block if left >= CHUNK else block[:left])
                left -= CHUNK
            await s.send_eof()

        async def recv(s: TCPStream) -> None:
            got = 0
            while data := await s.receive_some(1 << 20):
                got += len(data)
            assert got == per, (got, per)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for c, s in streams:
                nursery.start_soon(send, c)
                nursery.start_soon(recv, s)
        elapsed = time.perf_counter() - start
        for c, s in streams:
            await c.aclose()
            await s.aclose()
        return per * conns / elapsed / 1e6


async def pure(nbytes: int) -> float:
    """Bulk with the numpy accelerator off: the pure-Python checksum on both sides."""
    checksum.set_numpy(False)
    try:
        return await bulk(nbytes, 1, True)
    finally:
        checksum.set_numpy(True)


async def churn(total: int, workers: int = 16, segments: list[int] | None = None) -> float:
    """Set-ups + tear-downs per second: connect, accept, close both sides, wait for FINs.
    `segments` (if given) gets the number of TCP segments both stacks sent."""
    config = TCPConfig(time_wait=0.05)
    async with pair(False, config) as (sa, sb):
        listener = sb.listen(B, 5002, backlog=1024)

        async def server() -> None:
            async with trio.open_nursery() as nursery:
                while True:
                    s = await listener.accept()
                    nursery.start_soon(serve, s)

        async def serve(s: TCPStream) -> None:
            await s.receive_some()  # EOF
            await s.aclose()

        async def client(n: int) -> None:
            for _ in range(n):
                c = await sa.connect(B, 5002)
                await c.send_eof()
                await c.receive_some()  # the server's FIN
                await c.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            start = time.perf_counter()
            async with trio.open_nursery() as clients:
                for _ in range(workers):
                    clients.start_soon(client, total // workers)
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        if segments is not None:
            segments.append(sa.counters["segments_out"] + sb.counters["segments_out"])
        return (total // workers) * workers / elapsed


async def idle_memory(n: int) -> tuple[float, int]:
    """Bytes per idle established endpoint (traced allocations), and endpoints made."""
    async with pair(True) as (sa, sb):
        await _connected(sa, sb, 5003, 10)  # warm caches and code paths
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        streams = await _connected(sa, sb, 5004, n)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        per_endpoint = (after - before) / (2 * n)
        for c, s in streams:
            c.abort()
            s.abort()
        return per_endpoint, 2 * n


class _StepCounter(trio.abc.Instrument):
    """Counts task steps by task name and I/O waits (scheduling passes that block)."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}
        self.io_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        name = task.name.rsplit(".", 1)[-1]
        self.steps[name] = self.steps.get(name, 0) + 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


def count_churn(total: int, workers: int) -> None:
    """Print task steps, I/O waits and function calls per set-up + tear-down: the warm-up
    run's figures are subtracted out by measuring `total` and `2 * total` connections."""
    figures = []
    segments: list[int] = []
    for n in (total, 2 * total):
        counter = _StepCounter()
        prof = cProfile.Profile()
        prof.enable()
        trio.run(churn, n, workers, segments, instruments=[counter])
        prof.disable()
        calls = pstats.Stats(prof).total_calls  # type: ignore[attr-defined]
        figures.append((counter, calls))
    (c1, calls1), (c2, calls2) = figures
    per = 1 / (total // workers * workers)
    print(f"per connection (client + server, {workers} workers):")
    print(f"  TCP segments    {(segments[1] - segments[0]) * per:8.2f}")
    print(f"  function calls  {(calls2 - calls1) * per:8.1f}")
    print(f"  I/O waits       {(c2.io_waits - c1.io_waits) * per:8.2f}")
    print(f"  task steps      {(sum(c2.steps.values()) - sum(c1.steps.values())) * per:8.2f}")
    for name in sorted(c2.steps, key=lambda k: -c2.steps[k]):
        d = (c2.steps[name] - c1.steps.get(name, 0)) * per
        if abs(d) >= 0.005:
            print(f"    {name:<14}{d:8.2f}")


def checksum_rows() -> list[tuple[str, str]]:
    """µs per 64 KiB for the checksum strategies considered (see tcp/checksum.py)."""
    import array
    import timeit

    data = os.urandom(65536)

    def plain_mod() -> int:
        return int.from_bytes(data, "big") % 0xFFFF

    def array_h() -> int:
        return sum(array.array("H", data)) % 0xFFFF

    def wide_q() -> int:
        return sum(memoryview(data).cast("Q")) % 0xFFFF

    rows = []
    candidates: list[tuple[str, Callable[[], int]]] = [
        ("int.from_bytes % 0xFFFF", plain_mod),
        ("folded int (pure Python, used)", lambda: checksum._fold_sum(data)),
        ("memoryview.cast('Q') sum", wide_q),
        ("array('H') sum", array_h),
    ]
    if checksum._numpy() is not None:
        candidates.append(
            (
                "numpy (optional, used >= 2 KiB)",
                lambda: checksum._numpy_sum(checksum._numpy(), data),
            )
        )
    for name, fn in candidates:
        best = min(timeit.repeat(fn, number=50, repeat=5)) / 50
        rows.append((f"checksum 64 KiB: {name}", f"{best * 1e6:.0f} µs"))
    return rows


def run(fn: Callable[[], Awaitable[float]]) -> float:
    return trio.run(fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=64, help="MiB moved per bulk test")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--churn", type=int, default=3000, help="connections opened and closed")
    ap.add_argument("--idle", type=int, default=1000, help="idle connections for memory")
    ap.add_argument("--workers", type=int, default=16, help="concurrent set-up + tear-downs")
    ap.add_argument("--profile", choices=["bulk", "churn"], help="cProfile one test instead")
    ap.add_argument(
        "--count", action="store_true", help="task steps / calls per set-up + tear-down instead"
    )
    args = ap.parse_args()
    nbytes = args.mb << 20
    checksum.checksum(bytes(65536))  # import the optional numpy accelerator up front
    if args.count:
        count_churn(args.churn, args.workers)
        return

    if args.profile:
        target: Callable[[], Awaitable[object]]
        if args.profile == "bulk":

            def target() -> Awaitable[object]:
                return bulk(nbytes, 1, False)
        else:

            def target() -> Awaitable[object]:
                return churn(args.churn, args.workers)

        prof = cProfile.Profile()
        prof.enable()
        result = trio.run(target)
        prof.disable()
        print(f"{args.profile}: {result:.1f}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return

    rows = [
        ("bulk, 1 connection, verify off", f"{run(lambda: bulk(nbytes, 1, False)):.0f} MB/s"),
        ("bulk, 1 connection, verify on", f"{run(lambda: bulk(nbytes, 1, True)):.0f} MB/s"),
        ("bulk, 1 conn, verify on, no numpy", f"{run(lambda: pure(nbytes)):.0f} MB/s"),
        (
            f"bulk, {args.conns} connections, verify off",
            f"{run(lambda: bulk(nbytes, args.conns, False)):.0f} MB/s",
        ),
        ("set-up + tear-down", f"{run(lambda: churn(args.churn, args.workers)):.0f} conn/s"),
    ]
    rows += checksum_rows()
    per, count = trio.run(idle_memory, args.idle)
    rows.append((f"memory per idle endpoint ({count})", f"{per / 1024:.1f} KiB"))
    width = max(len(r[0]) for r in rows)
    print(f"{'test':<{width}}  result")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
