"""What the HTTP and SOCKS5 proxies cost against a direct connection.

    python bench/proxy_bench.py [--requests 1000] [--bulk-mb 64] [--rounds 3] [--stack]

Three processes: a small keep-alive HTTP origin (threads, blocking sockets), the agent's
proxies (serve_http_proxy + serve_socks with a Dialer), and this client (blocking
sockets). For each path -- direct, through the HTTP proxy (absolute URI, keep-alive),
through SOCKS5 (one handshake, then requests in the tunnel) -- it times N sequential
1-byte GETs on one connection (requests/s, p50/p99 latency) and one bulk download (MB/s).
Every response is read whole and checked; a short read aborts the run.

`--stack` makes the proxies reach the origin through two user-space NetStacks joined by
memory channels (the virtual network path) instead of through the OS.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BLOCK = bytes(range(256)) * 4096  # 1 MiB


# --- origin (run as a subprocess) ------------------------------------------------------


def _origin_conn(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            size = int(path.rsplit(b"/", 1)[1] or b"1")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
                         + (BLOCK[:size] if size <= 65536 else b""))
            if size > 65536:
                view = memoryview(BLOCK)
                left = size
                while left:
                    n = min(left, len(BLOCK))
                    conn.sendall(view[:n])
                    left -= n


def run_origin() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_origin_conn, args=(conn,), daemon=True).start()


# --- proxies (run as a subprocess) -----------------------------------------------------


def run_proxies(origin_port: int, through_stack: bool) -> None:
    import trio

    from norouter_trio.agent.dialer import Dialer, splice
    from norouter_trio.agent.http_proxy import serve_http_proxy
    from norouter_trio.agent.socks import serve_socks

    async def main() -> None:
        http_l = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        socks_l = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        async with trio.open_nursery() as nursery:
            connect: Callable[..., object] = trio.open_tcp_stream
            if through_stack:
                connect = await _two_stacks(nursery, origin_port, splice)
            dialer = Dialer(connect, hostname_map={"origin": "127.0.42.2"},  # type: ignore[arg-type]
                            vips=["127.0.42.2"])
            nursery.start_soon(serve_http_proxy, http_l, dialer)
            nursery.start_soon(serve_socks, socks_l, dialer)
            print(http_l.socket.getsockname()[1], socks_l.socket.getsockname()[1], flush=True)

    trio.run(main)


async def _two_stacks(nursery: object, origin_port: int, splice: Callable[..., object],
                      ) -> Callable[..., object]:
    """Stack A (the proxies' agent) <-> stack B (VIP 127.0.42.2, forwarding :80 to the
    origin over the OS), joined by memory channels as the manager would join them."""
    import trio

    from norouter_trio.tcp.netstack import NetStack

    a_out, b_in = trio.open_memory_channel[bytes](1024)
    b_out, a_in = trio.open_memory_channel[bytes](1024)
    stack_a = NetStack("127.0.42.1", a_out)
    stack_b = NetStack("127.0.42.2", b_out)
    await nursery.start(stack_a.run, a_in)  # type: ignore[attr-defined]
    await nursery.start(stack_b.run, b_in)  # type: ignore[attr-defined]
    listener = stack_b.listen("127.0.42.2", 80)

    async def forward(stream: trio.abc.Stream) -> None:
        target = await trio.open_tcp_stream("127.0.0.1", origin_port)
        await splice(stream, target)  # type: ignore[operator]

    nursery.start_soon(trio.serve_listeners, forward, [listener])  # type: ignore[attr-defined]

    async def connect(host: str, port: int) -> trio.abc.Stream:
        return await stack_a.connect("127.0.42.2", 80)

    return connect


# --- client ---------------------------------------------------------------------------


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one response (Content-Length framed); returns the body size."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(262144)
        if not data:
            raise RuntimeError("connection closed before a response")
        buf += data
    head_end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:head_end])
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bad response: {head[:80]!r}")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    del buf[:head_end]
    got = min(len(buf), length)
    del buf[:got]
    view = bytearray(1 << 20)
    while got < length:
        n = sock.recv_into(view, min(len(view), length - got))
        if not n:
            raise RuntimeError(f"response cut short at {got} of {length} bytes")
        got += n
    return length


def _socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    sock.sendall(b"\x05\x01\x00")
    if sock.recv(2) != b"\x05\x00":
        raise RuntimeError("SOCKS5 method refused")
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        reply += sock.recv(10 - len(reply))
    if reply[1] != 0:
        raise RuntimeError(f"SOCKS5 refused: {reply[1]}")


def measure(name: str, open_conn: Callable[[], socket.socket], target: Callable[[int], bytes],
            requests: int, bulk: int) -> dict[str, object]:
    sock = open_conn()
    buf = bytearray()
    latencies: list[float] = []
    for _ in range(20):  # warm-up
        sock.sendall(target(1))
        _read_response(sock, buf)
    start = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        sock.sendall(target(1))
        if _read_response(sock, buf) != 1:
            raise RuntimeError("short response")
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    t0 = time.perf_counter()
    sock.sendall(target(bulk))
    if _read_response(sock, buf) != bulk:
        raise RuntimeError("short bulk response")
    bulk_s = time.perf_counter() - t0
    sock.close()
    latencies.sort()
    return {"path": name, "req/s": requests / elapsed,
            "p50 ms": statistics.median(latencies) * 1e3,
            "p99 ms": latencies[int(len(latencies) * 0.99) - 1] * 1e3,
            "MB/s": bulk / bulk_s / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--bulk-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="median of this many rounds")
    ap.add_argument("--stack", action="store_true",
                    help="proxies reach the origin through two NetStacks")
    ap.add_argument("--origin", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--proxies", type=int, default=0, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.origin:
        run_origin()
        return
    if opts.proxies:
        run_proxies(opts.proxies, opts.stack)
        return

    me = [sys.executable, os.path.abspath(__file__)]
    origin = subprocess.Popen([*me, "--origin"], stdout=subprocess.PIPE, text=True)
    proxies: subprocess.Popen[str] | None = None
    try:
        assert origin.stdout is not None
        oport = int(origin.stdout.readline())
        proxies = subprocess.Popen([*me, "--proxies", str(oport),
                                    *(["--stack"] if opts.stack else [])],
                                   stdout=subprocess.PIPE, text=True)
        assert proxies.stdout is not None
        hport, sport = map(int, proxies.stdout.readline().split())
        host = "origin" if opts.stack else "127.0.0.1"
        dport = 80 if opts.stack else oport

        def direct() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", oport))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s

        def via_http() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", hport))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s

        def via_socks() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", sport))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _socks5_connect(s, host, dport)
            return s

        def origin_form(n: int) -> bytes:
            return b"GET /%d HTTP/1.1\r\nHost: o\r\n\r\n" % n

        def absolute(n: int) -> bytes:
            return b"GET http://%s:%d/%d HTTP/1.1\r\nHost: o\r\n\r\n" % (
                host.encode(), dport, n)

        bulk = opts.bulk_mb * 1024 * 1024
        paths = [("direct (OS)", direct, origin_form), ("HTTP proxy", via_http, absolute),
                 ("SOCKS5", via_socks, origin_form)]
        # Rounds interleave the paths so that load from elsewhere hits them alike; the
        # median round of each metric is reported.
        runs: dict[str, list[dict[str, object]]] = {name: [] for name, _, _ in paths}
        for _ in range(opts.rounds):
            for name, opener, target in paths:
                runs[name].append(measure(name, opener, target, opts.requests, bulk))
        rows = [{key: (statistics.median(float(r[key]) for r in results)  # type: ignore[arg-type]
                       if key != "path" else name) for key in results[0]}
                for name, results in runs.items()]
        base = rows[0]
        print(f"{opts.requests} sequential 1-byte GETs + one {opts.bulk_mb} MiB download, "
              f"median of {opts.rounds} rounds; proxies reach the origin via "
              f"{'two NetStacks' if opts.stack else 'the OS'}; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'path':<14}{'req/s':>9}{'vs direct':>11}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'MB/s':>9}{'vs direct':>11}")
        for row in rows:
            rate = float(row["req/s"])  # type: ignore[arg-type]
            mbs = float(row["MB/s"])  # type: ignore[arg-type]
            print(f"{row['path']!s:<14}{rate:>9.0f}"
                  f"{rate / float(base['req/s']) - 1:>+10.0%} "  # type: ignore[arg-type]
                  f"{float(row['p50 ms']):>9.3f}{float(row['p99 ms']):>9.3f}"  # type: ignore[arg-type]
                  f"{mbs:>9.0f}{mbs / float(base['MB/s']) - 1:>+10.0%} ")  # type: ignore[arg-type]
    finally:
        for proc in (proxies, origin):
            if proc is not None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
