"""What the HTTP and SOCKS5 proxies cost against loopback mode, through a real manager.

    python bench/proxy_bench.py [--quick] [--requests 1000] [--bulk-mb 64] [--rounds 3]
                                [--keepalive | --only-keepalive] [--paths loopback,http,...]
                                [--profile FILE.prof]

Setup (all on this machine, no root): an HTTP origin (a subprocess, a thread per
connection, blocking sockets: ~50 us a request, not the bottleneck); a manifest with two
hosts started by a real manager (`python -m norouter_trio FILE`): agent A (loopback mode,
HTTP proxy, SOCKS proxy) and agent B (its own process, like `ssh b norouter`) forwarding
VIP_B:PORT to the origin. Every path crosses the same virtual network (stack A -> manager
-> stack B -> origin); they differ only in how the client enters agent A:

  loopback   client -> real 127.0.42.B:PORT (agent A's OS listener) -> stack ...
  HTTP       client -> HTTP proxy of A, `GET http://b:PORT/...` (absolute URI)
  CONNECT    client -> HTTP proxy of A, `CONNECT b:PORT`, then the GET in the tunnel
  SOCKS5     client -> SOCKS proxy of A, SOCKS5 with the host name "b", then the GET

For each path: N sequential GETs of 1 byte, a new connection each (connect, handshake,
request, whole response, close): requests/s, p50/p99 latency; one 64 MiB download (MB/s);
and how many responses were cut short (fewer body bytes than Content-Length, or an error).
Rounds interleave the paths so load from elsewhere hits them alike; each metric is the
median over rounds, and each path is shown against loopback mode of the same run.
`--keepalive` adds the same with one connection for all N requests. Also shown: the CPU
time per request of agent A (where the proxies run) and of manager + both agents, read
from /proc: on a loaded machine it is steadier than the wall-clock figures; and the
context switches per request of those three processes (`cs`: each is a wake-up, so a
segment or a reply more per connection shows here first).

`--profile FILE` runs agent A under cProfile and writes FILE when the run ends
(`python -m pstats FILE`, then `sort tottime`, `stats 30`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = bytes(range(256)) * 4096  # 1 MiB
TIMEOUT = 15.0  # per socket operation; a request that stalls this long is counted cut short


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
            close = b"\nconnection: close" in head.lower()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n"
                         % (size, b"Connection: close\r\n" if close else b"")
                         + (BLOCK[:size] if size <= 65536 else b""))
            if size > 65536:
                view = memoryview(BLOCK)
                left = size
                while left:
                    n = min(left, len(BLOCK))
                    conn.sendall(view[:n])
                    left -= n
            if close:
                return


def run_origin() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # stopped by the bench: no traceback
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_origin_conn, args=(conn,), daemon=True).start()


# --- the virtual network ---------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class Network:
    vip_a: str
    vip_b: str
    port: int  # the forward on B, reached as VIP_B:port
    http_port: int
    socks_port: int
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agent_a: int = 0  # pid
    network: list[int] = field(default_factory=list)  # manager and agents: pids

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (agent A, manager + both agents)."""
        tick = os.sysconf("SC_CLK_TCK")

        def of(pid: int) -> float:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                return 0.0
            return (int(fields[11]) + int(fields[12])) / tick

        return of(self.agent_a), sum(of(pid) for pid in self.network)

    def switches(self) -> int:
        """Context switches so far (voluntary + not) of manager + both agents: each is a
        wake-up, and a segment or a reply more on the wire shows up here first."""
        total = 0
        for pid in self.network:
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.rsplit(None, 1)[1])
        return total

    def manifest(self, origin_port: int, profile: str | None) -> str:
        # Random VIPs and ports: other test runs on this machine use 127.0.42.x too.
        # A runs like the local host would (same argv), with a marker to find its pid.
        prof = f"'-m', 'cProfile', '-o', {profile!r}, " if profile else ""
        a_cmd = (f"    cmd: [{sys.executable!r}, '-X', 'norouter_bench_a', {prof}"
                 "'-m', 'norouter_trio']\n")
        return (
            "hosts:\n"
            "  a:\n"
            f"    vip: '{self.vip_a}'\n{a_cmd}"
            f"    http: {{listen: '127.0.0.1:{self.http_port}'}}\n"
            f"    socks: {{listen: '127.0.0.1:{self.socks_port}'}}\n"
            "    stateDir: {disable: true}\n"
            "  b:\n"
            f"    cmd: [{sys.executable!r}, '-m', 'norouter_trio']\n"
            f"    vip: '{self.vip_b}'\n"
            f"    ports: ['{self.port}:127.0.0.1:{origin_port}']\n"
            "    loopback: {disable: true}\n"
            "    stateDir: {disable: true}\n")


def start_network(profile: str | None) -> Network:
    rng = random.Random()
    for _ in range(50):
        a, b = rng.sample(range(160, 250), 2)
        vip_a, vip_b = f"127.0.42.{a}", f"127.0.42.{b}"
        port = rng.randrange(20000, 30000)
        if all(_bindable(ip, p) for ip, p in ((vip_b, port), (vip_a, 10053),
                                              (vip_b, 10053))):
            break
    else:
        raise SystemExit("no free 127.0.42.x address/port found for the bench")
    net = Network(vip_a, vip_b, port, _free_port("127.0.0.1"), _free_port("127.0.0.1"),
                  Path(tempfile.mkdtemp(prefix="proxy-bench-")))
    me = [sys.executable, os.path.abspath(__file__)]
    origin = subprocess.Popen([*me, "--origin"], stdout=subprocess.PIPE)
    net.procs.append(origin)
    assert origin.stdout is not None
    origin_port = int(origin.stdout.readline())
    (net.workdir / "bench.yaml").write_text(net.manifest(origin_port, profile))
    log = open(net.workdir / "manager.log", "wb")  # noqa: SIM115 - closed with the dir
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    manager = subprocess.Popen([sys.executable, "-m", "norouter_trio",
                                str(net.workdir / "bench.yaml")],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    net.procs.append(manager)
    deadline = time.monotonic() + 60
    while True:
        try:
            fetch_once(lambda: socket.create_connection((vip_b, port), timeout=2),
                       b"GET /1 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            fetch_once(lambda: socket.create_connection(("127.0.0.1", net.http_port),
                                                        timeout=2),
                       b"GET http://b:%d/1 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
                       % port)
            fetch_once(lambda: _socks5_open("127.0.0.1", net.socks_port, "b", port),
                       b"GET /1 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            net.network = [manager.pid, *_children(manager.pid)]
            for pid in net.network:
                if b"norouter_bench_a" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    net.agent_a = pid
            return net
        except (OSError, RuntimeError) as exc:
            if manager.poll() is not None or time.monotonic() > deadline:
                stop_network(net)
                text = (net.workdir / "manager.log").read_text(errors="replace")
                raise SystemExit(f"the virtual network did not come up ({exc}); manager "
                                 f"log:\n{text[-3000:]}") from None
            time.sleep(0.2)


def _children(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == ppid:
                out.append(int(entry.name))
    return out


def stop_network(net: Network) -> None:
    for proc in reversed(net.procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in reversed(net.procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(net.workdir, ignore_errors=True)


# --- client ---------------------------------------------------------------------------


class CutShort(Exception):
    """A response ended (or the connection broke) before its Content-Length."""


def _read_head(sock: socket.socket, buf: bytearray) -> bytes:
    while b"\r\n\r\n" not in buf:
        data = sock.recv(262144)
        if not data:
            raise CutShort(f"closed before a response head ({len(buf)} bytes)")
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head


def read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one Content-Length framed 200 response whole; returns the body size."""
    head = _read_head(sock, buf)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bad response: {head[:80]!r}")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    got = min(len(buf), length)
    del buf[:got]
    view = bytearray(1 << 20)
    while got < length:
        n = sock.recv_into(view, min(len(view), length - got))
        if not n:
            raise CutShort(f"response cut short at {got} of {length} bytes")
        got += n
    return length


def _socks5_open(proxy_host: str, proxy_port: int, host: str, port: int) -> socket.socket:
    sock = socket.create_connection((proxy_host, proxy_port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"\x05\x01\x00")
    if sock.recv(2) != b"\x05\x00":
        raise RuntimeError("SOCKS5 method refused")
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        data = sock.recv(10 - len(reply))
        if not data:
            raise CutShort("SOCKS5: closed in the handshake")
        reply += data
    if reply[1] != 0:
        raise RuntimeError(f"SOCKS5 refused: {reply[1]}")
    return sock


def _connect_open(proxy_port: int, host: str, port: int) -> tuple[socket.socket, bytearray]:
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n"
                 % (host.encode(), port, host.encode(), port))
    buf = bytearray()
    head = _read_head(sock, buf)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
    return sock, buf


def fetch_once(opener: Callable[[], socket.socket], request: bytes) -> int:
    with opener() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        return read_response(sock, bytearray())


@dataclass
class Path_:
    name: str
    open: Callable[[], tuple[socket.socket, bytearray]]  # a connection ready for a GET
    request: Callable[[int, bool], bytes]  # (size, close) -> request bytes


def make_paths(net: Network) -> list[Path_]:
    def plain(host: str, port: int) -> Callable[[], tuple[socket.socket, bytearray]]:
        def open_() -> tuple[socket.socket, bytearray]:
            sock = socket.create_connection((host, port), timeout=TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, bytearray()
        return open_

    def origin_form(size: int, close: bool) -> bytes:
        return b"GET /%d HTTP/1.1\r\nHost: b:%d\r\n%s\r\n" % (
            size, net.port, b"Connection: close\r\n" if close else b"")

    def absolute(size: int, close: bool) -> bytes:
        return b"GET http://b:%d/%d HTTP/1.1\r\nHost: b:%d\r\n%s\r\n" % (
            net.port, size, net.port, b"Connection: close\r\n" if close else b"")

    return [
        Path_("loopback", plain(net.vip_b, net.port), origin_form),
        Path_("HTTP proxy", plain("127.0.0.1", net.http_port), absolute),
        Path_("CONNECT", lambda: _connect_open(net.http_port, "b", net.port), origin_form),
        Path_("SOCKS5", lambda: (_socks5_open("127.0.0.1", net.socks_port, "b", net.port),
                                 bytearray()), origin_form),
    ]


@dataclass
class Result:
    rate: float
    p50: float
    p99: float
    mbs: float
    cut: int
    cpu_a: float  # agent A's CPU per request, microseconds
    cpu_all: float  # manager + agents
    cpu_mib: float  # agent A's CPU per MiB of the bulk download, milliseconds
    switches: float  # context switches of manager + agents per request


def _one_request(path: Path_) -> float:
    t0 = time.perf_counter()
    sock, buf = path.open()
    with sock:
        sock.sendall(path.request(1, True))
        if read_response(sock, buf) != 1:
            raise CutShort("wrong body size")
    return time.perf_counter() - t0


def measure(net: Network, path: Path_, requests: int, bulk: int,
            keepalive: bool) -> Result:
    latencies: list[float] = []
    cpu0 = net.cpu()
    cs0 = net.switches()
    cut = 0
    if keepalive:
        sock, buf = path.open()
    start = time.perf_counter()
    for _ in range(requests):
        try:
            if keepalive:
                t0 = time.perf_counter()
                sock.sendall(path.request(1, False))
                if read_response(sock, buf) != 1:
                    raise CutShort("wrong body size")
                latencies.append(time.perf_counter() - t0)
            else:
                latencies.append(_one_request(path))
        except (CutShort, OSError) as exc:
            cut += 1
            print(f"  {path.name}: cut short: {exc}", file=sys.stderr)
            if keepalive:
                sock.close()
                sock, buf = path.open()
    elapsed = time.perf_counter() - start
    cpu1 = net.cpu()
    cs1 = net.switches()
    if keepalive:
        sock.close()
    mbs = cpu_mib = float("nan")
    if bulk:
        cpu2 = net.cpu()
        t0 = time.perf_counter()
        try:
            sock, buf = path.open()
            with sock:
                sock.sendall(path.request(bulk, True))
                read_response(sock, buf)
            mbs = bulk / (time.perf_counter() - t0) / 1e6
            cpu_mib = (net.cpu()[0] - cpu2[0]) / (bulk / 2**20) * 1e3
        except (CutShort, OSError) as exc:
            cut += 1
            print(f"  {path.name}: bulk cut short: {exc}", file=sys.stderr)
    latencies.sort()
    if not latencies:
        latencies.append(float("nan"))
    return Result(rate=len(latencies) / elapsed,
                  p50=statistics.median(latencies) * 1e3,
                  p99=latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1e3,
                  mbs=mbs, cut=cut, cpu_a=(cpu1[0] - cpu0[0]) / requests * 1e6,
                  cpu_all=(cpu1[1] - cpu0[1]) / requests * 1e6, cpu_mib=cpu_mib,
                  switches=(cs1 - cs0) / requests)


def run_table(net: Network, paths: list[Path_], requests: int, bulk: int, rounds: int,
              keepalive: bool) -> None:
    runs: dict[str, list[Result]] = {p.name: [] for p in paths}
    for p in paths:  # warm-up: first connections, imports, caches
        for _ in range(20):
            with contextlib.suppress(CutShort, OSError):
                measure(net, p, 1, 0, keepalive)
    for _ in range(rounds):
        for p in paths:
            runs[p.name].append(measure(net, p, requests, bulk, keepalive))
    med = {name: Result(rate=statistics.median(r.rate for r in rs),
                        p50=statistics.median(r.p50 for r in rs),
                        p99=statistics.median(r.p99 for r in rs),
                        mbs=statistics.median(r.mbs for r in rs),
                        cut=sum(r.cut for r in rs),
                        cpu_a=statistics.median(r.cpu_a for r in rs),
                        cpu_all=statistics.median(r.cpu_all for r in rs),
                        cpu_mib=statistics.median(r.cpu_mib for r in rs),
                        switches=statistics.median(r.switches for r in rs))
           for name, rs in runs.items()}
    base = med.get("loopback") or next(iter(med.values()))
    how = "one keep-alive connection" if keepalive else "a new connection per request"
    print(f"\n{requests} sequential 1-byte GETs, {how}; "
          f"{f'one {bulk >> 20} MiB download; ' if bulk else ''}"
          f"median of {rounds} round(s); cut short counted over all "
          f"{rounds * (requests + 1)} responses per path")
    print("(CPU A / CPU all: microseconds per request of agent A / of manager + both agents;"
          " A ms/MiB: agent A's CPU per MiB of the download; cs: context switches per"
          " request of manager + both agents)")
    print(f"{'path':<12}{'req/s':>8}{'vs loop':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'MB/s':>8}{'vs loop':>9}{'cut':>5}{'CPU A':>8}{'CPU all':>9}{'A ms/MiB':>10}"
          f"{'cs':>6}")
    for name, r in med.items():
        print(f"{name:<12}{r.rate:>8.0f}{r.rate / base.rate - 1:>+9.0%}{r.p50:>9.2f}"
              f"{r.p99:>9.2f}{r.mbs:>8.0f}{r.mbs / base.mbs - 1:>+9.0%}{r.cut:>5d}"
              f"{r.cpu_a:>8.0f}{r.cpu_all:>9.0f}{r.cpu_mib:>10.1f}{r.switches:>6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="200 requests, 8 MiB, 1 round (a smoke run)")
    ap.add_argument("--requests", type=int, default=None, help="default 1000")
    ap.add_argument("--bulk-mb", type=int, default=None, help="default 64")
    ap.add_argument("--rounds", type=int, default=None, help="median of rounds (default 3)")
    ap.add_argument("--keepalive", action="store_true",
                    help="also measure with one keep-alive connection per path")
    ap.add_argument("--only-keepalive", action="store_true",
                    help="measure only with one keep-alive connection per path")
    ap.add_argument("--paths", default="loopback,http,connect,socks5",
                    help="comma-separated subset (e.g. to profile one path)")
    ap.add_argument("--profile", metavar="FILE", help="run agent A under cProfile into FILE")
    ap.add_argument("--origin", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.origin:
        run_origin()
        return
    requests = opts.requests or (200 if opts.quick else 1000)
    bulk = (opts.bulk_mb if opts.bulk_mb is not None else 8 if opts.quick else 64) << 20
    rounds = opts.rounds or (1 if opts.quick else 3)
    profile = os.path.abspath(opts.profile) if opts.profile else None
    net = start_network(profile)
    try:
        print(f"manager + agents a ({net.vip_a}, loopback mode, proxies) and b "
              f"({net.vip_b}, forward :{net.port} -> origin); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        wanted = [w.strip().lower() for w in opts.paths.split(",")]
        paths = [p for p in make_paths(net)
                 if p.name.split()[0].lower() in wanted]
        if not opts.only_keepalive:
            run_table(net, paths, requests, bulk, rounds, keepalive=False)
        if opts.keepalive or opts.only_keepalive:
            run_table(net, paths, requests, bulk, rounds, keepalive=True)
    finally:
        stop_network(net)
    if profile:
        print(f"\nprofile of agent A: {profile}")


if __name__ == "__main__":
    main()
