"""Switch throughput: the manager between two fake agents, against a raw pipe.

    python bench/switch_bench.py [--scale 1.0] [--repeat 3]

Agent A (tests/fake_agent.py --pump) writes L3 frames to B's VIP as fast as it can; agent B
(--sink) only counts bytes.  "pipe" connects A's stdout straight to B's stdin (the physical
limit of this machine: two processes and one pipe); "manager" puts the manager's switch in
between (two pipes, the frame parser, the routing decision, the queue, batched writes).
Rates are measured by the sink from its first to its last byte; drops are the manager's.
Goal: >= 1 GB/s with 64 KiB frames and >= 100k frames/s with 1500-byte frames on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from norouter_trio.manager import HostState, Manager, Observer  # noqa: E402
from norouter_trio.manifest import load_manifest  # noqa: E402

FAKE = str(ROOT / "tests" / "fake_agent.py")
SINK_RE = re.compile(r"sink (\d+) (\d+) ([0-9.]+)")
CASES = [("64 KiB", 65535, 20000), ("1500 B", 1500, 400000)]


def raw_pipe(size: int, count: int) -> tuple[int, float]:
    r, w = os.pipe()
    pump = subprocess.Popen([sys.executable, FAKE, "--no-configure", "--vip", "127.0.42.101",
                             "--pump", "127.0.42.102", "--size", str(size), "--count",
                             str(count)], stdin=subprocess.DEVNULL, stdout=w,
                            stderr=subprocess.DEVNULL)
    sink = subprocess.Popen([sys.executable, FAKE, "--no-configure", "--sink", str(count),
                             "--size", str(size)], stdin=r, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    os.close(r)
    os.close(w)
    _, err = sink.communicate(timeout=300)
    pump.kill()
    pump.wait()
    m = SINK_RE.search(err)
    assert m, err
    return int(m.group(1)), float(m.group(3))


class SinkWatcher(Observer):
    def __init__(self) -> None:
        self.result: tuple[int, float] | None = None
        self.got = trio.Event()

    def agent_stderr(self, host: HostState, line: str) -> None:
        m = SINK_RE.match(line)
        if m:
            self.result = (int(m.group(1)), float(m.group(3)))
            self.got.set()


async def through_manager(size: int, count: int) -> tuple[int, float, dict[str, int], float]:
    text = f"""
hosts:
  a:
    vip: 127.0.42.101
    cmd: ["{sys.executable}", "{FAKE}", "--features", "tcp,dns", "--pump", "127.0.42.102",
          "--size", "{size}", "--count", "{count}"]
  b:
    vip: 127.0.42.102
    cmd: ["{sys.executable}", "{FAKE}", "--features", "tcp,dns", "--sink", "{count}",
          "--size", "{size}"]
"""
    manager = Manager(load_manifest(text), grace=1.0)
    watcher = SinkWatcher()
    manager.add_observer(watcher)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        with trio.fail_after(300):
            await watcher.got.wait()
        manager.stop()
    assert watcher.result is not None
    drops = manager.host("b").drops
    return watcher.result[0], watcher.result[1], drops, manager.host("a").bytes_in


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply the frame counts")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per case and path (pipe and manager alternate); best and "
                        "median are shown")
    args = p.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)
    print(f"switch_bench: {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine: figures are "
          f"noisy), {args.repeat} runs each")
    print(f"{'frames':>8} {'path':>8} {'MB/s best':>10} {'median':>8} {'frames/s best':>14} "
          f"{'median':>8} {'ratio':>6} {'MB/CPU-s':>9}  drops")
    for label, size, count in CASES:
        n = int(count * args.scale)
        raw: list[float] = []
        mgr: list[float] = []
        per_cpu: list[float] = []
        drops_total: dict[str, int] = {}
        for _ in range(args.repeat):
            frames_raw, secs_raw = raw_pipe(size, n)
            raw.append(frames_raw / secs_raw if secs_raw else 0.0)
            cpu0 = time.process_time()
            frames_mgr, secs_mgr, drops, bytes_in = trio.run(through_manager, size, n)
            cpu = time.process_time() - cpu0
            mgr.append(frames_mgr / secs_mgr if secs_mgr else 0.0)
            per_cpu.append(bytes_in / cpu / 1e6 if cpu else 0.0)
            for k, v in drops.items():
                drops_total[k] = drops_total.get(k, 0) + v
        med_raw = statistics.median(raw)
        for path, rates in (("pipe", raw), ("manager", mgr)):
            best, med = max(rates), statistics.median(rates)
            ratio = f"{med / med_raw:6.2f}" if med_raw else "     -"
            extra = (f"{statistics.median(per_cpu):9.0f}  "
                     + (" ".join(f"{k}={v}" for k, v in drops_total.items()) or "0")
                     if path == "manager" else "")
            print(f"{label:>8} {path:>8} {best * size / 1e6:>10.1f} {med * size / 1e6:>8.1f} "
                  f"{best:>14.0f} {med:>8.0f} {ratio} {extra}")
    print("MB/s and frames/s: delivered to the sink, first to last byte (best and median "
          "of the runs); ratio: median over the pipe's median.  MB/CPU-s: bytes the manager "
          "read per CPU second of its process (start-up included), what one free core "
          "would carry.")


if __name__ == "__main__":
    main()
