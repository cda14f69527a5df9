"""Benchmark of the sans-IO TCP core: two connections joined in memory, no IP, no checksums;
then the same through two `TCPStack`s (IPv4 parse/build and checksums, still no trio).

Prints a short table: bulk MB/s one way (and both ways), handshakes+closes per second,
and memory per idle established connection (tracemalloc); the stack rows price the
per-packet work (parse, build, checksum) that the trio layer pays on every packet.
Run: python bench/tcp_core_bench.py [--mbytes 512] [--conns 5000] [--calls]
`--calls` instead prints Python function calls per connection (cProfile) for the two
open+close rows: a figure that, unlike conn/s, does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from norouter_trio.tcp.connection import TCPConfig, TCPConnection
from norouter_trio.tcp.stack import Conn, NewConnection, TCPStack

A = ("127.0.42.1", 40000)
B = ("127.0.42.2", 80)


def _pump(a: TCPConnection, b: TCPConnection, now: float) -> int:
    """Move segments both ways until quiet; returns how many moved."""
    moved = 0
    while True:
        sa = a.segments_to_send(now)
        for seg in sa:
            b.receive_segment(seg, now)
        sb = b.segments_to_send(now)
        for seg in sb:
            a.receive_segment(seg, now)
        if not sa and not sb:
            return moved
        moved += len(sa) + len(sb)


def _run_due(a: TCPConnection, b: TCPConnection, now: float) -> None:
    """Fire the timers due at `now` on both ends and drop their events (nobody reads
    them in a benchmark)."""
    for conn in (a, b):
        t = conn.get_timer()
        if t is not None and t <= now:
            conn.handle_timer(now)
        while conn.next_event() is not None:
            pass


def _handshake(now: float, config: TCPConfig) -> tuple[TCPConnection, TCPConnection]:
    a = TCPConnection.connect(A, B, now, config)
    (syn,) = a.segments_to_send(now)
    b = TCPConnection.accept(B, A, syn, now, config)
    _pump(a, b, now)
    return a, b


def bench_bulk(total: int, both_ways: bool, mss: int = 65495) -> tuple[float, float]:
    """MB/s of `total` bytes sent a->b (and b->a if both_ways), reader always draining."""
    config = TCPConfig(mss=mss)
    now = 0.0
    a, b = _handshake(now, config)
    chunk = bytes(256 * 1024)
    view = memoryview(chunk)
    sent_a = sent_b = got_a = got_b = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    while got_b < total or (both_ways and got_a < total):
        now += 0.0001
        if sent_a < total:
            sent_a += a.send(view[: min(len(chunk), total - sent_a)], now)
        if both_ways and sent_b < total:
            sent_b += b.send(view[: min(len(chunk), total - sent_b)], now)
        for seg in a.segments_to_send(now):
            b.receive_segment(seg, now)
        while b.readable_bytes:
            got_b += len(b.read(1 << 20, now))
        for seg in b.segments_to_send(now):
            a.receive_segment(seg, now)
        while a.readable_bytes:
            got_a += len(a.read(1 << 20, now))
        _run_due(a, b, now)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    moved = got_b + (got_a if both_ways else 0)
    return moved / elapsed / 1e6, moved / cpu / 1e6


def bench_handshakes(count: int) -> tuple[float, float]:
    """Connections opened, one byte each way, closed (through TIME-WAIT) per second."""
    config = TCPConfig(time_wait=0.0)
    now = 0.0
    t0 = time.perf_counter()
    c0 = time.process_time()
    for _ in range(count):
        a, b = _handshake(now, config)
        a.send(b"q", now)
        _pump(a, b, now)
        b.read(10, now)
        b.send(b"r", now)
        _pump(a, b, now)
        a.read(10, now)
        a.close(now)
        _pump(a, b, now)
        b.close(now)
        _pump(a, b, now)
        for conn in (a, b):
            conn.handle_timer(now)
        assert a.state.value == "CLOSED" and b.state.value == "CLOSED", (a, b)
    return count / (time.perf_counter() - t0), count / (time.process_time() - c0)


def _stack_pump(sa: TCPStack, sb: TCPStack, ca: Conn, cb: Conn | None, now: float) -> Conn:
    """Move packets between two stacks until quiet; returns B's end (made by the SYN)."""
    while True:
        moved = 0
        for pkt in sa.output(ca, now) + sa.take_output():
            out = sb.receive_packet(pkt, now)
            if isinstance(out, NewConnection):
                cb = out.conn
            moved += 1
        if cb is not None:
            for pkt in sb.output(cb, now) + sb.take_output():
                sa.receive_packet(pkt, now)
                moved += 1
        if not moved:
            assert cb is not None
            return cb


def bench_stack_handshakes(count: int, verify: bool) -> tuple[float, float]:
    """As `bench_handshakes`, through two TCPStacks: every segment is an IPv4 packet."""
    config = TCPConfig(time_wait=0.0)
    sa = TCPStack(A[0], config=config, verify_checksums=verify)
    sb = TCPStack(B[0], config=config, verify_checksums=verify)
    sb.add_listener(B[0], B[1])
    now = 0.0
    t0 = time.perf_counter()
    c0 = time.process_time()
    for _ in range(count):
        ca = sa.connect(B[0], B[1], now)
        cb = _stack_pump(sa, sb, ca, None, now)
        ca.tcp.send(b"q", now)
        _stack_pump(sa, sb, ca, cb, now)
        cb.tcp.read(10, now)
        cb.tcp.send(b"r", now)
        _stack_pump(sa, sb, ca, cb, now)
        ca.tcp.read(10, now)
        ca.tcp.close(now)
        _stack_pump(sa, sb, ca, cb, now)
        cb.tcp.close(now)
        _stack_pump(sa, sb, ca, cb, now)
        for st, c in ((sa, ca), (sb, cb)):
            c.tcp.handle_timer(now)
            while c.tcp.next_event() is not None:
                pass
            assert c.tcp.state.value == "CLOSED", c.tcp
            st.forget(c)
    return count / (time.perf_counter() - t0), count / (time.process_time() - c0)


def bench_stack_bulk(total: int, mss: int, verify: bool) -> tuple[float, float]:
    """MB/s a->b through two TCPStacks (one connection, reader always draining)."""
    config = TCPConfig(mss=mss)
    sa = TCPStack(A[0], config=config, verify_checksums=verify)
    sb = TCPStack(B[0], config=config, verify_checksums=verify)
    sb.add_listener(B[0], B[1])
    now = 0.0
    ca = sa.connect(B[0], B[1], now)
    cb = _stack_pump(sa, sb, ca, None, now)
    a, b = ca.tcp, cb.tcp
    view = memoryview(bytes(256 * 1024))
    sent = got = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    while got < total:
        now += 0.0001
        if sent < total:
            sent += a.send(view[: min(len(view), total - sent)], now)
        for pkt in sa.output(ca, now):
            sb.receive_packet(pkt, now)
        while b.readable_bytes:
            got += len(b.read(1 << 20, now))
        for pkt in sb.output(cb, now):
            sa.receive_packet(pkt, now)
        _run_due(a, b, now)
    return got / (time.perf_counter() - t0) / 1e6, got / (time.process_time() - c0) / 1e6


def bench_memory(count: int) -> float:
    """Bytes per idle established connection (both ends counted, result per end)."""
    config = TCPConfig()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    keep = []
    for i in range(count):
        a, b = _handshake(float(i), config)
        while a.next_event() is not None:
            pass
        while b.next_event() is not None:
            pass
        keep.append((a, b))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / (2 * count)


def count_calls(count: int) -> None:
    """Function calls per connection of the open+close rows (load-independent)."""
    for name, run in (
        ("open+1B each way+close", lambda: bench_handshakes(count)),
        ("TCPStack: open+1B+close, cksum", lambda: bench_stack_handshakes(count, True)),
    ):
        prof = cProfile.Profile()
        prof.runcall(run)
        stats = pstats.Stats(prof)
        calls = sum(row[1] for row in stats.stats.values())  # type: ignore[attr-defined]
        print(f"{name:<32}{calls / count:10.1f}  calls/conn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mbytes", type=int, default=512, help="bulk transfer size in MB")
    p.add_argument("--conns", type=int, default=5000, help="handshake+close iterations")
    p.add_argument("--calls", action="store_true", help="print calls per connection only")
    args = p.parse_args()
    if args.calls:
        count_calls(min(args.conns, 2000))
        return
    total = args.mbytes * 1_000_000
    one = bench_bulk(total, False)
    both = bench_bulk(total // 2, True)
    small = bench_bulk(total // 20, False, mss=1460)
    hs = bench_handshakes(args.conns)
    shs = bench_stack_handshakes(args.conns, True)
    sbulk = bench_stack_bulk(total // 20, 1460, True)
    mem = bench_memory(2000) / 1024
    rows = [
        ("measure", "wall clock", "CPU time", ""),
        ("bulk one way", f"{one[0]:10.1f}", f"{one[1]:10.1f}", "MB/s"),
        ("bulk both ways (sum)", f"{both[0]:10.1f}", f"{both[1]:10.1f}", "MB/s"),
        ("bulk one way, MSS 1460", f"{small[0]:10.1f}", f"{small[1]:10.1f}", "MB/s"),
        ("open+1B each way+close", f"{hs[0]:10.0f}", f"{hs[1]:10.0f}", "conn/s"),
        ("TCPStack: open+1B+close, cksum", f"{shs[0]:10.0f}", f"{shs[1]:10.0f}", "conn/s"),
        ("TCPStack: bulk MSS 1460, cksum", f"{sbulk[0]:10.1f}", f"{sbulk[1]:10.1f}", "MB/s"),
        ("idle established conn", f"{mem:10.2f}", "", "KiB"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, wall, cpu, unit in rows:
        print(f"{name:<{width}}  {wall:>10}  {cpu:>10}  {unit}")


if __name__ == "__main__":
    main()
