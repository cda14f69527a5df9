"""End-to-end benchmark: client -> agent -> manager -> agent -> server, beside a direct
loopback connection to the same server in the same run.

    python bench/e2e_bench.py [--quick] [--profile DIR]

Two agents on this machine (no root needed): "local" (the manager's own host, loopback
mode: the client connects to the real 127.0.99.2:PORT) and "srv" (started through its
`cmd`, forwards to the servers on 127.0.0.1). Measures bulk MB/s (1 and 8 connections),
sequential new-connection HTTP GETs per second, 1-byte echo round trips (p50/p99), and the
RSS and CPU of every process at rest and under load. CPU use per phase shows which process
limits a figure (one at ~100 % of a core is the bottleneck), and the time each spent
runnable but waiting for a CPU shows what the machine's other load cost. The "per
operation" table divides each process's CPU time and context switches (about one per
wake-up) by the operations of the phase: figures that depend little on the machine's
load, unlike the rates, and that show what each change saves; for the agents it adds the
TCP segments each sent per operation (exact: read from the stack report a SIGUSR1 logs).
--profile DIR also runs the manager and both agents under cProfile and prints their top
functions and the function calls per GET (the agents' profiles cover the GET phase only: SIGUSR2
starts and stops them). --net 127.0.N picks the agents' VIPs (127.0.N.1 and .2), so that two
benchmarks can run on one machine at once.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import pstats
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOCAL_VIP, SRV_VIP = "127.0.99.1", "127.0.99.2"
CLK = os.sysconf("SC_CLK_TCK")
#: An -X option that marks the srv agent's command line (Python ignores unknown -X).
SRV_MARK = "norouter-bench=srv"
LOCAL_MARK = "norouter-bench=local"


# ---------------------------------------------------------------- servers (own process)


def _bulk(conn: socket.socket) -> None:
    """First 8 bytes: how many bytes to send back."""
    with conn:
        n = int.from_bytes(conn.recv(8), "big")
        block = b"\xa5" * (1 << 20)
        while n > 0:
            k = min(n, len(block))
            conn.sendall(block[:k] if k < len(block) else block)
            n -= k


def _http(conn: socket.socket) -> None:
    with conn:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n")


def _echo(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            conn.sendall(data)


def serve(ports: list[int]) -> None:
    for port, handler in zip(ports, (_bulk, _http, _echo), strict=True):
        srv = socket.create_server(("127.0.0.1", port), backlog=1024)

        def loop(srv: socket.socket = srv, handler: Callable[[socket.socket], None] = handler
                 ) -> None:
            while True:
                c, _ = srv.accept()
                threading.Thread(target=handler, args=(c,), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()
    print("serving", flush=True)
    threading.Event().wait()


# ---------------------------------------------------------------- clients


def bulk(addr: tuple[str, int], nbytes: int, conns: int) -> float:
    """MB/s summed over `conns` connections downloading nbytes/conns each."""
    per = nbytes // conns
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with socket.create_connection(addr, timeout=60) as s:
                s.sendall(per.to_bytes(8, "big"))
                got = 0
                buf = bytearray(1 << 20)
                while got < per:
                    k = s.recv_into(buf)
                    if not k:
                        raise ConnectionError(f"EOF after {got} of {per} bytes")
                    got += k
        except BaseException as e:
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    secs = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"bulk to {addr}: {errors[0]!r}")
    return per * conns / secs / 1e6


def requests(addr: tuple[str, int], seconds: float) -> tuple[float, int]:
    """Sequential HTTP GETs, a new connection each; returns (requests per second, count)."""
    n = 0
    t0 = time.perf_counter()
    req = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
    while time.perf_counter() - t0 < seconds:
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(req)
            resp = b""
            while data := s.recv(4096):
                resp += data
            if not resp.endswith(b"hello world\n"):
                raise RuntimeError(f"bad HTTP answer from {addr}: {resp!r}")
        n += 1
    return n / (time.perf_counter() - t0), n


#: The last echo run through norouter, described by `echo_tail` (printed after the tables).
ECHO_TAIL: list[str] = []


def echo_rtt(addr: tuple[str, int], count: int) -> tuple[float, float]:
    """1-byte round trips on one connection; returns (p50, p99) in milliseconds."""
    with socket.create_connection(addr, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for i in range(count + 20):
            t0 = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("echo: bad byte")
            if i >= 20:  # warm-up
                samples.append((time.perf_counter() - t0) * 1e3)
    ECHO_TAIL[:] = [echo_tail(samples)]
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def echo_tail(samples: list[float]) -> str:
    """How the slow round trips (over twice the median) are spread, in the order they
    ran: scattered ones point at the path's own work (a timer, a collector pass), long
    runs of consecutive ones at the whole machine slowing down for a while."""
    limit = 2 * statistics.median(samples)
    runs: list[tuple[int, int]] = []  # (first index, length) of consecutive slow ones
    first: int | None = None
    for i, ms in enumerate([*samples, 0.0]):
        if ms > limit:
            if first is None:
                first = i
        elif first is not None:
            runs.append((first, i - first))
            first = None
    in_long = {j for start, n in runs if n >= 3 for j in range(start, start + n)}
    rest = sorted(ms for i, ms in enumerate(samples) if i not in in_long)
    p99 = rest[int(len(rest) * 0.99) - 1] if rest else 0.0
    return (f"{sum(n for _, n in runs)} of {len(samples)} round trips over {limit:.2f} ms "
            f"(2x p50), in {len(runs)} runs (longest {max((n for _, n in runs), default=0)};"
            f" {len(in_long)} in runs of 3 or more); p99 without those runs {p99:.3f} ms")


# ---------------------------------------------------------------- processes


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    if SRV_MARK.encode() in argv:
        return "srv agent"
    if LOCAL_MARK.encode() in argv:
        return "local agent"
    if b"agent" in argv:
        return "local agent"
    return ""


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def switches(pid: int) -> int:
    """Context switches of the whole process so far: each is (about) one wake-up."""
    total = 0
    with contextlib.suppress(OSError):
        for t in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                for line in (t / "status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt")):
                        total += int(line.split()[1])
    return total


def cpu_secs(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one), whole process."""
    on = wait = 0.0
    with contextlib.suppress(OSError):
        for t in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                f = (t / "schedstat").read_text().split()
                on += int(f[0]) / 1e9
                wait += int(f[1]) / 1e9
    return on, wait


class Watch:
    """RSS peak and CPU use of the norouter processes during one phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {n: rss_mb(p) for n, p in pids.items()}
        self._stop = threading.Event()

    @contextlib.contextmanager
    def phase(self) -> Iterator[dict[str, float]]:
        cpu0 = {n: cpu_secs(p) for n, p in self.pids.items()}
        sw0 = {n: switches(p) for n, p in self.pids.items()}
        t0 = time.perf_counter()
        self._stop.clear()
        th = threading.Thread(target=self._sample, daemon=True)
        th.start()
        usage: dict[str, float] = {}
        try:
            yield usage
        finally:
            self._stop.set()
            th.join()
            secs = time.perf_counter() - t0
            for n, p in self.pids.items():
                on, wait = cpu_secs(p)
                usage[n] = (on - cpu0[n][0]) / secs * 100
                usage[n + " wait"] = (wait - cpu0[n][1]) / secs * 100
                usage[n + " cpu"] = on - cpu0[n][0]
                usage[n + " switches"] = switches(p) - sw0[n]

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            for n, p in self.pids.items():
                self.peak[n] = max(self.peak[n], rss_mb(p))


def toggle_agent_profilers(pids: dict[str, int]) -> None:
    """Start (first call) or stop and write (second) the agents' phase profiles."""
    for n, p in pids.items():
        if "agent" in n:
            os.kill(p, signal.SIGUSR2)


def stack_segments(pids: dict[str, int], log_path: Path) -> dict[str, int]:
    """Each agent's TCP segments sent so far, from the stack report a SIGUSR1 makes it log
    (it reaches the manager's log): segments per operation are exact, unlike timings."""
    agents = {n: p for n, p in pids.items() if "agent" in n}
    start = log_path.stat().st_size
    for p in agents.values():
        os.kill(p, signal.SIGUSR1)
    found: dict[str, int] = {}
    deadline = time.monotonic() + 5
    while len(found) < len(agents) and time.monotonic() < deadline:
        time.sleep(0.05)
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            m = re.search(r"(\S+): stack report \(SIGUSR1\): (\{.*\})", line)
            if m:
                counters = ast.literal_eval(m.group(2))
                name = "local agent" if m.group(1) == LOCAL_VIP else "srv agent"
                found[name] = int(counters.get("segments_out", 0))
    return found


# ---------------------------------------------------------------- main


def manifest(ports: list[int], srv_cmd: list[str], local_cmd: list[str] | None) -> str:
    fw = ", ".join(f'"{p}:127.0.0.1:{p}"' for p in ports)
    local = "" if local_cmd is None else f", cmd: {local_cmd!r}".replace("'", '"')
    return (f"hosts:\n"
            f"  local: {{vip: \"{LOCAL_VIP}\", stateDir: {{disable: true}}{local}}}\n"
            f"  srv:\n"
            f"    cmd: {srv_cmd!r}\n".replace("'", '"') +
            f"    vip: \"{SRV_VIP}\"\n"
            f"    ports: [{fw}]\n"
            f"    loopback: {{disable: true}}\n"
            f"    stateDir: {{disable: true}}\n")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def profiled_agent(out: str, argv: list[str]) -> None:
    """Run the agent with a profiler that SIGUSR2 starts and, the second time, stops and
    writes to `out`: a profile of one phase only, without the agent's start-up."""
    import cProfile
    import runpy

    prof = cProfile.Profile()
    state = {"on": False}

    def toggle(_sig: int, _frame: Any) -> None:
        if not state["on"]:
            state["on"] = True
            prof.enable()
        else:
            prof.disable()
            prof.dump_stats(out)

    signal.signal(signal.SIGUSR2, toggle)
    sys.argv = ["norouter_trio", *argv]
    runpy.run_module("norouter_trio", run_name="__main__", alter_sys=True)


def main() -> int:
    if sys.argv[1:2] == ["--profiled-agent"]:
        profiled_agent(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller transfers, shorter runs")
    ap.add_argument("--profile", metavar="DIR", help="cProfile the manager and both agents")
    ap.add_argument("--net", default="127.0.99", help="VIPs: NET.1 (local), NET.2 (srv)")
    ap.add_argument("--only", choices=["bulk", "get", "echo"], help="run one measure only")
    ap.add_argument("--serve", nargs=3, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return 0
    global LOCAL_VIP, SRV_VIP
    LOCAL_VIP, SRV_VIP = f"{a.net}.1", f"{a.net}.2"
    q = a.quick
    bulk_bytes = (64 if q else 256) << 20
    req_secs = 2.0 if q else 4.0
    echo_n = 500 if q else 2000

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x))
    ports = free_ports(3)
    server = subprocess.Popen([sys.executable, __file__, "--serve", *map(str, ports)],
                              stdout=subprocess.PIPE, env=env)
    assert server.stdout is not None
    server.stdout.readline()
    tmp = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    prof = Path(a.profile).resolve() if a.profile else None
    py = [sys.executable]
    srv_cmd = [*py, "-X", SRV_MARK, "-m", "norouter_trio"]
    mgr_cmd = [*py, "-m", "norouter_trio"]
    local_cmd: list[str] | None = None
    if prof:
        prof.mkdir(parents=True, exist_ok=True)
        srv_cmd = [*py, "-X", SRV_MARK, __file__, "--profiled-agent",
                   str(prof / "srv-agent.prof")]
        mgr_cmd = [*py, "-m", "cProfile", "-o", str(prof / "manager.prof"), "-m",
                   "norouter_trio"]
        local_cmd = [*py, "-X", LOCAL_MARK, __file__, "--profiled-agent",
                     str(prof / "local-agent.prof")]
    (tmp / "bench.yaml").write_text(manifest(ports, srv_cmd, local_cmd))
    log = open(tmp / "manager.log", "w+b")  # noqa: SIM115 - read back at the end
    mgr = subprocess.Popen([*mgr_cmd, str(tmp / "bench.yaml")], stdout=log, stderr=log,
                           env=env, cwd=tmp)
    try:
        deadline = time.monotonic() + 30
        while True:
            text = (tmp / "manager.log").read_text(errors="replace")
            if text.count("Ready: ") >= 2:
                break
            if mgr.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"manager did not get ready:\n{text[-3000:]}")
            time.sleep(0.1)
        via = {i: (SRV_VIP, p) for i, p in enumerate(ports)}
        direct = {i: ("127.0.0.1", p) for i, p in enumerate(ports)}
        for _ in range(100):  # the loopback listener is up once Ready is logged
            with contextlib.suppress(OSError):
                socket.create_connection(via[1], timeout=1).close()
                break
            time.sleep(0.05)
        pids = {}
        for p in descendants(mgr.pid):
            name = "manager" if p == mgr.pid else proc_name(p)
            if name and name not in pids:
                pids[name] = p
        w = Watch(pids)
        rest = {n: rss_mb(p) for n, p in pids.items()}
        rows: list[tuple[str, str, str, str, dict[str, float]]] = []
        raw: list[tuple[str, Any]] = []
        per_op: list[tuple[str, float, dict[str, float]]] = []

        def measure(name: str, fn: Callable[[tuple[str, int]], Any], idx: int,
                    fmt: Callable[[Any], str], ratio: Callable[[Any, Any], str],
                    ops: Callable[[Any], tuple[str, float]]) -> None:
            d = fn(direct[idx])
            seg0 = stack_segments(pids, tmp / "manager.log")
            profiling = prof is not None and name.startswith("new-conn")
            with w.phase() as usage:
                if profiling:
                    toggle_agent_profilers(pids)
                v = fn(via[idx])
                if profiling:
                    toggle_agent_profilers(pids)
            seg1 = stack_segments(pids, tmp / "manager.log")
            for n, k in seg1.items():
                if n in seg0:
                    usage[n + " segments"] = k - seg0[n]
            rows.append((name, fmt(v), fmt(d), ratio(v, d), usage))
            raw.append(("get" if "GET" in name else name, v))
            per_op.append((*ops(v), usage))

        def pct(v: float, d: float) -> str:
            return f"{v / d * 100:.1f} %"

        if a.only in (None, "bulk"):
            mb = ("MB, 1 conn", bulk_bytes / 1e6)
            measure("bulk MB/s, 1 conn", lambda ad: bulk(ad, bulk_bytes, 1), 0,
                    lambda v: f"{v:.1f}", pct, lambda v: mb)
            measure("bulk MB/s, 8 conns", lambda ad: bulk(ad, bulk_bytes, 8), 0,
                    lambda v: f"{v:.1f}", pct, lambda v: ("MB, 8 conns", bulk_bytes / 1e6))
        if a.only in (None, "get"):
            measure("new-conn GET/s", lambda ad: requests(ad, req_secs), 1,
                    lambda v: f"{v[0]:.0f}", lambda v, d: pct(v[0], d[0]),
                    lambda v: ("GET", v[1]))
        if a.only in (None, "echo"):
            measure("echo RTT p50/p99 ms", lambda ad: echo_rtt(ad, echo_n), 2,
                    lambda v: f"{v[0]:.3f}/{v[1]:.3f}", lambda v, d: f"+{v[1] - d[1]:.3f} p99",
                    lambda v: ("echo round trip", echo_n + 20))

        names = list(pids)
        print(f"\nend to end ({'quick' if q else 'full'}; {os.cpu_count()} cores; "
              f"load avg {os.getloadavg()[0]:.2f}). Per process during each phase: % of a "
              f"CPU used / % of the time runnable but waiting for a CPU (machine load)")
        head = f"{'measure':<22}{'via norouter':>14}{'direct':>12}{'ratio':>12}"
        print(head + "".join(f"{n:>15}" for n in names))
        for name, v, d, r, usage in rows:
            print(f"{name:<22}{v:>14}{d:>12}{r:>12}" + "".join(
                f"{usage.get(n, 0):>9.0f}/{usage.get(n + ' wait', 0):<5.0f}" for n in names))
        print("\nper operation: CPU ms used / context switches (~wake-ups) [/ TCP segments "
              "sent], each process (load-independent: what each figure costs)")
        for what, count, usage in per_op:
            print(f"  per {what:<18}" + "".join(
                f"{n:>13} {usage.get(n + ' cpu', 0) * 1e3 / count:6.3f}/"
                f"{usage.get(n + ' switches', 0) / count:<5.1f}"
                + (f"/{usage[n + ' segments'] / count:.1f}" if n + " segments" in usage
                   else "") for n in names))
        print("\nRSS MB: " + ", ".join(f"{n} {rest[n]:.1f} at rest / {w.peak[n]:.1f} peak"
                                       for n in names))
        if ECHO_TAIL:
            print(f"echo tail (via norouter): {ECHO_TAIL[0]}")
    finally:
        mgr.send_signal(signal.SIGINT)
        try:
            mgr.wait(20)
        except subprocess.TimeoutExpired:
            mgr.kill()
        server.kill()
        log.close()
    if prof:
        gets = next((v[1] for name, v, *_ in raw if name == "get"), 0)
        for f in sorted(prof.glob("*.prof")):
            print(f"\n--- {f.name}: top 15 by own time")
            st = pstats.Stats(str(f))
            st.sort_stats("tottime").print_stats(15)
            if gets:
                print_calls_per_op(st, gets, "GET")
    return 0


def print_calls_per_op(st: pstats.Stats, ops: int, what: str, top: int = 40) -> None:
    """Function calls per operation, by function: what a per-connection change saves."""
    stats: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    rows = sorted(((nc, tt, fn) for fn, (_cc, nc, tt, _ct, _callers) in stats.items()),
                  reverse=True)
    total = sum(nc for nc, _, _ in rows)
    print(f"function calls per {what} ({ops} {what}s): {total / ops:.0f}")
    for nc, tt, (file, line, name) in rows[:top]:
        if nc < ops / 2:
            break
        short = "/".join(file.split("/")[-2:])
        print(f"  {nc / ops:7.2f} {tt / ops * 1e6:7.1f} us  {short}:{line}({name})")


if __name__ == "__main__":
    sys.exit(main())
