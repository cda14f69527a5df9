"""Replay a NoRouter scenario file: namespaces, services, a manager, and checked steps.

    python3 tests/scenario_runner.py scenarios/NAME.yaml [--keep] [--debug]
    python3 tests/scenario_runner.py --cleanup          # remove namespaces left by --keep

A scenario file (YAML) has these keys; strings anywhere may use the placeholders
`{ns.NAME}` (the real namespace name), `{dir.NAME}` (a scratch directory per namespace),
`{dir}` (the service's own), `{python}`, `{repo}` and `{tool}` (the test tools below):

    description: what it shows
    timeout: 120                 # bound for the whole scenario, seconds
    namespaces:                  # one network namespace per host
      NAME:
        files: {REL_PATH: TEXT}  # written under {dir.NAME}
        etc: {FILE: TEXT}        # written to /etc/netns/NS/FILE: `ip netns exec` mounts it
                                 # over /etc/FILE (hosts, resolv.conf); removed at the end
        addresses: [CIDR, ...]   # extra addresses on lo
        services:                # started before the manager, stopped at the end
          - {name: web, cmd: "...", ready: "IP:PORT"}
    links: [{a: NS, a_addr: CIDR, b: NS, b_addr: CIDR}]   # veth pairs
    manager: {ns: NAME, args: ["--debug"]}
    manifest: {...}              # the NoRouter manifest, placeholders substituted
    steps: [...]                 # see STEP_DOCS

The runner always deletes its namespaces and the processes in them (also when a step
fails), and every wait has a bound. The `tool` sub-command holds the traffic generators
the steps run inside namespaces (stdlib only, so they start fast in any namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve()
NS_PREFIX = "nrs"
ETC_NETNS = Path("/etc/netns")  # netns._delete removes /etc/netns/NS with the namespace

STEP_DOCS = """
steps (each a mapping; `ns: NAME` picks the namespace, default the manager's):
  ready: [HOST, ...] | all     wait for the manager's `Ready: VIP` line for each host
  wait_tcp: IP:PORT            poll until a TCP connect succeeds (timeout: default 20)
  run: CMD                     string (sh -c) or list; expect: {exit, stdout_contains,
                               stdout_not_contains, stderr_contains, sha256}; repeat: N;
                               background: NAME (start only, no expect)
  wait: NAME                   wait for a background process; expect: as for run
  wait_output: NAME            wait until its stdout contains `contains:`
  transfer: IP:PORT            tool client; mode: up|down|echo, bytes, reply, conns,
                               pause_after, pause
  kill_agent: NS               kill the norouter agent(s) running in NS (signal: KILL)
  expect_log: REGEX            wait until the manager's log matches
  wait_file: PATH              wait until the file (path as the runner sees it) contains
                               `contains:` (a string or list), e.g. one an agent writes
  rss: {max_mb: N}             every norouter process in the scenario's namespaces
  restart_manager: {}          stop the manager (SIGINT) and start it again
  stop_manager: {}             SIGINT; it must exit with 0 and leave no agent behind
  sleep: SECONDS               only where time itself is what is tested
"""


class ScenarioError(Exception):
    """A step did not meet its expectation; the message names the step."""


# ---------------------------------------------------------------- helpers


def parse_size(v: int | str) -> int:
    """`256M`, `64k`, `1G` or a plain integer."""
    if isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", v)
    if not m:
        raise ValueError(f"bad size {v!r}: use e.g. 65536, 64k, 256M")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(m.group(1)) * mult


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


_BLOCK = 1 << 16


def _base(seed: int) -> bytes:
    return random.Random(seed).randbytes(_BLOCK + 257)


def stream_chunks(seed: int, n: int) -> Iterator[memoryview]:
    """Deterministic pseudo-random bytes: block i is a shifted window of a per-seed base,
    so reordered or duplicated blocks change the digest."""
    base = memoryview(_base(seed))
    i = 0
    while n > 0:
        k = min(n, _BLOCK)
        off = (i * 131) % 257
        yield base[off:off + k]
        n -= k
        i += 1


def stream_digest(seed: int, n: int) -> str:
    h = hashlib.sha256()
    for c in stream_chunks(seed, n):
        h.update(c)
    return h.hexdigest()


def recv_exact_line(sock: socket.socket, limit: int = 4096) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        b = sock.recv(1)
        if not b or len(buf) > limit:
            raise ConnectionError(f"no header line (got {bytes(buf)!r})")
        buf += b
    return bytes(buf[:-1])


# ---------------------------------------------------------------- tools


def _serve_conn(conn: socket.socket) -> None:
    """One test-server connection; the first line picks the mode:
    `echo` (until EOF), `sink REPLY SEED` (read to EOF, answer `SHA COUNT\\n` then REPLY
    bytes of stream SEED), `source N SEED` (send N bytes of stream SEED)."""
    with conn:
        try:
            words = recv_exact_line(conn).decode().split()
        except ConnectionError:
            return  # a readiness probe: connected and closed
        try:
            if words[0] == "echo":
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            elif words[0] == "sink":
                reply, seed = int(words[1]), int(words[2])
                h, count = hashlib.sha256(), 0
                while data := conn.recv(1 << 18):
                    h.update(data)
                    count += len(data)
                conn.sendall(f"{h.hexdigest()} {count}\n".encode())
                for c in stream_chunks(seed, reply):
                    conn.sendall(c)
                conn.shutdown(socket.SHUT_WR)
            elif words[0] == "source":
                for c in stream_chunks(int(words[2]), int(words[1])):
                    conn.sendall(c)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
        except (OSError, IndexError, ValueError) as e:
            print(f"serve: connection ended: {e!r}", file=sys.stderr, flush=True)


def tool_serve(addr: str) -> int:
    host, port = split_addr(addr)
    srv = socket.create_server((host, port), backlog=512, reuse_port=False)
    print(f"serving on {addr}", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


@dataclass
class ClientOpts:
    addr: str
    mode: str
    nbytes: int
    reply: int
    seed: int
    pause_after: int = -1
    pause: float = 0.0
    timeout: float = 120.0


def _read_all(sock: socket.socket, opts: ClientOpts, h: Any) -> int:
    got = 0
    paused = opts.pause_after < 0
    while True:
        try:
            data = sock.recv(1 << 18)
        except TimeoutError:
            raise ScenarioError(f"stalled: nothing for {opts.timeout}s after {got} bytes "
                                f"from {opts.addr}") from None
        if not data:
            break
        h.update(data)
        got += len(data)
        if not paused and got >= opts.pause_after:
            paused = True
            print(f"PAUSED after {got} bytes", flush=True)
            time.sleep(opts.pause)
            print("RESUMED", flush=True)
    return got


def run_client(opts: ClientOpts) -> str:
    """One connection of `tool client`; raises on any mismatch, returns a summary."""
    host, port = split_addr(opts.addr)
    with socket.create_connection((host, port), timeout=opts.timeout) as s:
        if opts.mode == "up":
            s.sendall(f"sink {opts.reply} {opts.seed + 1}\n".encode())
            for c in stream_chunks(opts.seed, opts.nbytes):
                s.sendall(c)
            s.shutdown(socket.SHUT_WR)
            line = recv_exact_line(s).decode().split()
            want = stream_digest(opts.seed, opts.nbytes)
            if line != [want, str(opts.nbytes)]:
                raise ScenarioError(f"server saw {line}, sent {[want, opts.nbytes]}")
            h = hashlib.sha256()
            got = _read_all(s, opts, h)
            if got != opts.reply or h.hexdigest() != stream_digest(opts.seed + 1, opts.reply):
                raise ScenarioError(f"reply after half-close: {got} bytes, want {opts.reply}")
            return f"up {opts.nbytes} + reply {got}"
        if opts.mode == "down":
            s.sendall(f"source {opts.nbytes} {opts.seed}\n".encode())
            h = hashlib.sha256()
            got = _read_all(s, opts, h)
            if got != opts.nbytes or h.hexdigest() != stream_digest(opts.seed, opts.nbytes):
                raise ScenarioError(f"down: got {got} bytes (want {opts.nbytes}) or bad sha256")
            return f"down {got}"
        if opts.mode == "echo":
            s.sendall(b"echo\n")
            err: list[BaseException] = []

            def writer() -> None:
                try:
                    for c in stream_chunks(opts.seed, opts.nbytes):
                        s.sendall(c)
                    s.shutdown(socket.SHUT_WR)
                except OSError as e:
                    err.append(e)

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            h = hashlib.sha256()
            got = _read_all(s, opts, h)
            t.join(opts.timeout)
            if err:
                raise err[0]
            if got != opts.nbytes or h.hexdigest() != stream_digest(opts.seed, opts.nbytes):
                raise ScenarioError(f"echo: got {got} bytes back (want {opts.nbytes}) or bad data")
            return f"echo {got}"
        raise ScenarioError(f"unknown client mode {opts.mode!r}")


def tool_client(ns: argparse.Namespace) -> int:
    results: list[str | BaseException] = [""] * ns.conns
    start = time.monotonic()

    def one(i: int) -> None:
        opts = ClientOpts(ns.addr, ns.mode, parse_size(ns.bytes), parse_size(ns.reply),
                          ns.seed + 1000 * i, parse_size(ns.pause_after) if ns.pause else -1,
                          ns.pause, ns.timeout)
        try:
            results[i] = run_client(opts)
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(ns.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(ns.timeout + ns.pause)
    bad = [(i, r) for i, r in enumerate(results) if not isinstance(r, str) or not r]
    secs = time.monotonic() - start
    for i, r in bad[:10]:
        print(f"connection {i}: FAILED: {r!r}", flush=True)
    if bad:
        print(f"FAILED {len(bad)}/{ns.conns} connections", flush=True)
        return 1
    total = (parse_size(ns.bytes) + (parse_size(ns.reply) if ns.mode == "up" else 0)) * ns.conns
    print(f"OK {ns.conns} connection(s), {ns.mode}: {'; '.join(sorted(set(map(str, results))))}"
          f"; {total} bytes in {secs:.2f}s ({total / secs / 1e6:.1f} MB/s)", flush=True)
    return 0


def tool_wait_tcp(addr: str, timeout: float) -> int:
    host, port = split_addr(addr)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return 0
        except OSError as e:
            if time.monotonic() > deadline:
                print(f"nothing accepts on {addr} after {timeout}s: {e}", flush=True)
                return 1
            time.sleep(0.05)  # polling a port: there is no event to wait for


def tool_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="scenario_runner.py tool")
    sub = p.add_subparsers(dest="tool", required=True)
    s = sub.add_parser("serve", help="multi-mode test server (echo, sink, source)")
    s.add_argument("addr")
    c = sub.add_parser("client", help="checked transfer against `serve`")
    c.add_argument("addr")
    c.add_argument("mode", choices=["up", "down", "echo"])
    c.add_argument("--bytes", default="1M")
    c.add_argument("--reply", default="0")
    c.add_argument("--conns", type=int, default=1)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--pause-after", default="1M")
    c.add_argument("--pause", type=float, default=0.0)
    c.add_argument("--timeout", type=float, default=120.0)
    w = sub.add_parser("wait-tcp")
    w.add_argument("addr")
    w.add_argument("--timeout", type=float, default=20.0)
    ns = p.parse_args(argv)
    if ns.tool == "serve":
        return tool_serve(ns.addr)
    if ns.tool == "client":
        return tool_client(ns)
    return tool_wait_tcp(ns.addr, ns.timeout)


# ---------------------------------------------------------------- the runner


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""


@dataclass
class Scenario:
    path: Path
    spec: dict[str, Any]
    workdir: Path
    debug: bool = False
    ns: dict[str, Any] = field(default_factory=dict)        # name -> netns.Netns
    services: list[Proc] = field(default_factory=list)
    background: dict[str, Proc] = field(default_factory=dict)
    manager: Proc | None = None
    manager_runs: int = 0
    log_offset: int = 0

    # -- placeholders
    def subst(self, v: Any, own: str | None = None) -> Any:
        if isinstance(v, str):
            def rep(m: re.Match[str]) -> str:
                kind, name = m.group(1), m.group(2)
                if kind == "ns":
                    return str(self.ns[name].name)
                if kind == "dir" and name:
                    return str(self.workdir / name)
                if kind == "dir":
                    return str(self.workdir / (own or "_"))
                if kind == "python":
                    return sys.executable
                if kind == "repo":
                    return str(REPO)
                return f"{shlex.quote(sys.executable)} {shlex.quote(str(RUNNER))} tool"
            return re.sub(r"\{(ns|dir|python|repo|tool)(?:\.([\w-]+))?\}", rep, v)
        if isinstance(v, list):
            return [self.subst(x, own) for x in v]
        if isinstance(v, dict):
            return {k: self.subst(x, own) for k, x in v.items()}
        return v

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        # `python3` in scenario commands is this interpreter (venv, pyenv, CI alike)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def argv(self, cmd: str | list[str]) -> list[str]:
        return ["sh", "-c", cmd] if isinstance(cmd, str) else [str(x) for x in cmd]

    def spawn(self, name: str, ns: str, cmd: str | list[str]) -> Proc:
        out = self.workdir / f"{name}.out"
        err = self.workdir / f"{name}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = self.ns[ns].popen(self.argv(cmd), stdout=fo, stderr=fe,
                                  stdin=subprocess.DEVNULL, env=self.env(),
                                  start_new_session=True)
        return Proc(name, p, out, err)

    def run_in(self, ns: str, cmd: str | list[str],
               timeout: float) -> subprocess.CompletedProcess[bytes]:
        try:
            done: subprocess.CompletedProcess[bytes] = self.ns[ns].run(
                self.argv(cmd), check=False, timeout=timeout, capture_output=True,
                env=self.env())
            return done
        except subprocess.TimeoutExpired as e:
            raise ScenarioError(f"`{cmd}` in {ns} did not finish within {timeout}s; "
                                f"output: {(e.stdout or b'')[-2000:]!r}") from None

    # -- set-up
    def setup(self, netns: Any) -> None:
        for name, conf in (self.spec.get("namespaces") or {}).items():
            conf = conf or {}
            d = self.workdir / name
            d.mkdir(parents=True, exist_ok=True)
            for rel, text in (conf.get("files") or {}).items():
                f = d / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(self.subst(str(text), name))
            if conf.get("etc"):
                etc = ETC_NETNS / self.ns[name].name
                etc.mkdir(parents=True, exist_ok=True)
                for fname, text in conf["etc"].items():
                    if "/" in fname or fname in ("", ".", ".."):
                        raise ScenarioError(f"namespaces.{name}.etc: {fname!r} is not a "
                                            "file name in /etc")
                    (etc / fname).write_text(self.subst(str(text), name))
            for cidr in conf.get("addresses") or []:
                self.ns[name].run(["ip", "addr", "add", cidr, "dev", "lo"])
        for link in self.spec.get("links") or []:
            netns.veth(self.ns[link["a"]], link["a_addr"], self.ns[link["b"]], link["b_addr"])
        for name, conf in (self.spec.get("namespaces") or {}).items():
            for svc in (conf or {}).get("services") or []:
                cmd = self.subst(svc["cmd"], name)
                self.services.append(self.spawn(f"svc-{name}-{svc['name']}", name, cmd))
                if svc.get("ready"):
                    self.wait_tcp(name, svc["ready"], float(svc.get("timeout", 20)))
        manifest = self.subst(self.spec["manifest"])
        import yaml
        (self.workdir / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        self.start_manager()

    def mgr_ns(self) -> str:
        return str(self.spec["manager"]["ns"])

    def start_manager(self) -> None:
        args = [str(a) for a in self.spec["manager"].get("args") or []]
        if self.debug and "--debug" not in args:
            args.append("--debug")
        cmd = [sys.executable, "-m", "norouter_trio", *args, str(self.workdir / "manifest.yaml")]
        self.manager_runs += 1
        self.manager = self.spawn(f"manager{self.manager_runs}", self.mgr_ns(), cmd)
        self.log_offset = 0

    def manager_log(self) -> str:
        assert self.manager is not None
        return self.manager.stderr() + self.manager.stdout()

    def stop_manager(self, timeout: float = 10) -> int | None:
        m = self.manager
        if m is None or m.popen.poll() is not None:
            return m.popen.returncode if m else None
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.popen.pid, signal.SIGINT)
        try:
            return m.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            m.popen.kill()
            m.popen.wait(5)
            return None

    # -- waits
    def wait_tcp(self, ns: str, addr: str, timeout: float) -> None:
        r = self.run_in(ns, [sys.executable, str(RUNNER), "tool", "wait-tcp", addr,
                             "--timeout", str(timeout)], timeout + 10)
        if r.returncode != 0:
            raise ScenarioError(f"in {ns}: {r.stdout.decode().strip()}")

    def wait_until(self, what: str, timeout: float, cond: Any) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.manager and self.manager.popen.poll() is not None and "manager" not in what:
                raise ScenarioError(f"{what}: the manager exited "
                                    f"({self.manager.popen.returncode}) first")
            if time.monotonic() > deadline:
                raise ScenarioError(f"{what}: not within {timeout}s")
            time.sleep(0.05)  # files and /proc have no change notification here

    # -- norouter processes
    def norouter_pids(self, ns: str) -> list[int]:
        found = []
        for pid in self.ns[ns].pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"norouter" in a for a in cmdline) and b"tool" not in cmdline:
                found.append(pid)
        return found

    def rss_mb(self, pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    # -- steps
    def step(self, i: int, st: dict[str, Any]) -> str:
        st = self.subst(st)
        on = st.get("ns", self.mgr_ns())
        timeout = float(st.get("timeout", 30))
        if "ready" in st:
            hosts = self.spec["manifest"]["hosts"]
            names = list(hosts) if st["ready"] == "all" else st["ready"]
            for h in names:
                vip = hosts[h]["vip"]
                self.wait_until(f"Ready: {vip} ({h})", timeout,
                                lambda v=vip: re.search(rf"Ready: {re.escape(v)}\b",
                                                        self.manager_log()))
            return f"ready: {', '.join(names)}"
        if "wait_tcp" in st:
            self.wait_tcp(on, st["wait_tcp"], timeout)
            return f"{on}: {st['wait_tcp']} accepts"
        if "run" in st or "transfer" in st:
            cmd = st["run"] if "run" in st else self.transfer_cmd(st)
            if "background" in st:
                self.background[st["background"]] = self.spawn(f"bg-{st['background']}", on, cmd)
                return f"{on}: started {st['background']}"
            # a transfer reports its own stalls (socket timeout); give it time to say so
            limit = timeout + 15 if "transfer" in st else timeout
            for _ in range(int(st.get("repeat", 1))):
                r = self.run_in(on, cmd, limit)
                self.check(st, f"{on}: {cmd}", r.returncode, r.stdout, r.stderr)
            out = r.stdout.decode(errors="replace").strip().splitlines()
            return f"{on}: {cmd if isinstance(cmd, str) else shlex.join(cmd)}" + (
                f" -> {out[-1][:100]}" if out else "")
        if "wait" in st:
            p = self.background[st["wait"]]
            try:
                p.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                raise ScenarioError(f"{st['wait']} still running after {timeout}s; "
                                    f"stdout: {p.stdout()[-1000:]}") from None
            self.check(st, st["wait"], p.popen.returncode, p.out.read_bytes(), p.err.read_bytes())
            last = p.stdout().strip().splitlines()[-1:] or [""]
            return f"{st['wait']} finished: {last[0][:120]}"
        if "wait_output" in st:
            p = self.background[st["wait_output"]]
            self.wait_until(f"{st['wait_output']} prints {st['contains']!r}", timeout,
                            lambda: st["contains"] in p.stdout() or p.popen.poll() is not None)
            if st["contains"] not in p.stdout():
                raise ScenarioError(f"{st['wait_output']} exited before printing "
                                    f"{st['contains']!r}: {p.stdout()[-1000:]}")
            return f"{st['wait_output']} printed {st['contains']!r}"
        if "kill_agent" in st:
            ns = st["kill_agent"]
            pids = [pid for pid in self.norouter_pids(ns)
                    if b"agent" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            if not pids:
                raise ScenarioError(f"no norouter agent runs in {ns}")
            sig = getattr(signal, "SIG" + st.get("signal", "KILL"))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            return f"killed agent(s) {pids} in {ns}"
        if "expect_log" in st:
            start = self.log_offset
            self.wait_until(f"manager log matching {st['expect_log']!r}", timeout,
                            lambda: re.search(st["expect_log"], self.manager_log()[start:]))
            m = re.search(st["expect_log"], self.manager_log()[start:])
            assert m is not None
            return f"manager log: {m.group(0)[:120]!r}"
        if "wait_file" in st:
            path = Path(st["wait_file"])
            wants = st.get("contains") or []
            wants = [wants] if isinstance(wants, str) else [str(w) for w in wants]

            def has_all() -> bool:
                try:
                    text = path.read_text(errors="replace")
                except OSError:
                    return False
                return all(w in text for w in wants)

            try:
                self.wait_until(f"{path} containing {wants}", timeout, has_all)
            except ScenarioError as e:
                try:
                    now = path.read_text(errors="replace")[-1500:]
                except OSError as oe:
                    now = f"(unreadable: {oe})"
                raise ScenarioError(f"{e}; it holds:\n{now}") from None
            return f"{path} contains {wants}"
        if "rss" in st:
            limit = float(st["rss"]["max_mb"])
            seen = []
            for name in self.ns:
                for pid in self.norouter_pids(name):
                    with contextlib.suppress(OSError):
                        seen.append((name, pid, self.rss_mb(pid)))
            if not seen:
                raise ScenarioError("rss: no norouter process found")
            over = [s for s in seen if s[2] > limit]
            desc = ", ".join(f"{n}/{p}={mb:.0f}MB" for n, p, mb in seen)
            if over:
                raise ScenarioError(f"rss over {limit} MB: {desc}")
            return f"rss: {desc}"
        if "restart_manager" in st:
            self.stop_manager()
            self.start_manager()
            return "manager restarted"
        if "stop_manager" in st:
            rc = self.stop_manager(timeout)
            want = st["stop_manager"].get("exit", 0) if isinstance(st["stop_manager"],
                                                                     dict) else 0
            if rc != want:
                raise ScenarioError(f"manager exited with {rc} after SIGINT, want {want}")
            left = {n: self.norouter_pids(n) for n in self.ns}
            deadline = time.monotonic() + 5
            while any(left.values()) and time.monotonic() < deadline:
                time.sleep(0.05)
                left = {n: self.norouter_pids(n) for n in self.ns}
            if any(left.values()):
                raise ScenarioError(f"norouter processes left after the manager stopped: {left}")
            return f"manager stopped ({rc}), no agent left"
        if "sleep" in st:
            time.sleep(float(st["sleep"]))
            return f"slept {st['sleep']}s"
        raise ScenarioError(f"unknown step {st!r}\n{STEP_DOCS}")

    def transfer_cmd(self, st: dict[str, Any]) -> list[str]:
        cmd = [sys.executable, str(RUNNER), "tool", "client", st["transfer"],
               st.get("mode", "up"), "--bytes", str(st.get("bytes", "1M")),
               "--reply", str(st.get("reply", 0)), "--conns", str(st.get("conns", 1)),
               "--timeout", str(st.get("timeout", 30))]
        if "pause" in st:
            cmd += ["--pause", str(st["pause"]), "--pause-after", str(st.get("pause_after", "1M"))]
        if "seed" in st:
            cmd += ["--seed", str(st["seed"])]
        return cmd

    def check(self, st: dict[str, Any], what: str, rc: int, out: bytes, err: bytes) -> None:
        exp = st.get("expect") or {}
        text = out.decode(errors="replace")
        problems = []
        if rc != exp.get("exit", 0):
            problems.append(f"exit {rc}, want {exp.get('exit', 0)}")
        for key, src in (("stdout_contains", text), ("stderr_contains",
                                                     err.decode(errors="replace"))):
            wants = exp.get(key) or []
            for w in [wants] if isinstance(wants, str) else wants:
                if w not in src:
                    problems.append(f"{key.split('_')[0]} lacks {w!r}")
        unwanted = exp.get("stdout_not_contains") or []
        for w in [unwanted] if isinstance(unwanted, str) else unwanted:
            if str(w) in text:
                problems.append(f"stdout has {w!r}")
        if "sha256" in exp and hashlib.sha256(out).hexdigest() != exp["sha256"]:
            problems.append(f"stdout sha256 {hashlib.sha256(out).hexdigest()}, "
                            f"want {exp['sha256']}")
        if problems:
            raise ScenarioError(f"{what}: {'; '.join(problems)}\n--- stdout:\n{text[-1500:]}"
                                f"\n--- stderr:\n{err.decode(errors='replace')[-1500:]}")

    def teardown(self) -> None:
        for p in list(self.background.values()) + self.services:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(5)
        self.stop_manager(5)


def load(path: Path) -> dict[str, Any]:
    import yaml
    spec = yaml.safe_load(path.read_text())
    for key in ("namespaces", "manager", "manifest", "steps"):
        if key not in spec:
            raise ScenarioError(f"{path}: missing top-level key {key!r}")
    return spec  # type: ignore[no-any-return]


def run_scenario(path: str | Path, *, keep: bool = False, debug: bool = False,
                 log: Any = print) -> None:
    """Replay one scenario file; raises ScenarioError naming the failed step."""
    import netns
    path = Path(path)
    spec = load(path)
    workdir = Path(tempfile.mkdtemp(prefix=f"scenario-{path.stem}-"))
    sc = Scenario(path, spec, workdir, debug)
    deadline = time.monotonic() + float(spec.get("timeout", 120))
    names = list(spec["namespaces"])
    cm = netns.namespaces(*[NS_PREFIX] * len(names)) if not keep else contextlib.nullcontext(
        [netns.create(NS_PREFIX) for _ in names])
    with cm as made:
        sc.ns = dict(zip(names, made, strict=True))
        log(f"[{path.stem}] namespaces: "
            + ", ".join(f"{n}={m.name}" for n, m in sc.ns.items()) + f"; files in {workdir}")
        passed = False
        try:
            sc.setup(netns)
            for i, st in enumerate(spec["steps"], 1):
                if time.monotonic() > deadline:
                    raise ScenarioError(f"scenario timeout ({spec.get('timeout', 120)}s) "
                                        f"reached before step {i}")
                t0 = time.monotonic()
                try:
                    msg = sc.step(i, st)
                except ScenarioError as e:
                    raise ScenarioError(f"step {i} ({st}): {e}") from None
                log(f"[{path.stem}] step {i} ok ({time.monotonic() - t0:.1f}s): {msg}")
            passed = True
        except BaseException as e:
            if sc.manager is not None:
                tail = sc.manager_log()[-4000:]
                if isinstance(e, ScenarioError):
                    raise ScenarioError(f"{path.name}: {e}\n--- manager log (tail):\n{tail}"
                                        ) from None
            raise
        finally:
            if not keep:
                sc.teardown()
                if passed:  # logs are kept only when something failed
                    shutil.rmtree(workdir, ignore_errors=True)
            else:
                log(f"[{path.stem}] --keep: namespaces and processes left up (enter one with "
                    f"`ip netns exec NAME bash`; logs in {workdir}); remove them with "
                    f"`python3 {RUNNER.relative_to(REPO)} --cleanup`")


def cleanup_kept() -> None:
    """Delete namespaces left by --keep runs whose runner process is gone."""
    import netns
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{NS_PREFIX}-(\d+)-\d+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            netns._delete(name)
            print(f"deleted {name}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tool":
        return tool_main(argv[1:])
    sys.path.insert(0, str(Path(__file__).parent))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=STEP_DOCS, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("scenarios", nargs="*", help="scenario files (scenarios/*.yaml)")
    p.add_argument("--keep", action="store_true",
                   help="leave namespaces and processes up for debugging")
    p.add_argument("--debug", action="store_true", help="run the manager with --debug")
    p.add_argument("--cleanup", action="store_true", help="remove namespaces left by --keep")
    ns = p.parse_args(argv)
    if ns.cleanup:
        cleanup_kept()
        return 0
    failed = 0
    for f in ns.scenarios:
        t0 = time.monotonic()
        try:
            run_scenario(f, keep=ns.keep, debug=ns.debug)
            print(f"PASS {f} ({time.monotonic() - t0:.1f}s)")
        except ScenarioError as e:
            failed += 1
            print(f"FAIL {f} ({time.monotonic() - t0:.1f}s): {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
