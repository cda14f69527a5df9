"""The manager with fake agents: real subprocesses speaking frames (tests/fake_agent.py).

Each fake agent takes commands on a FIFO (send a packet, suggest a route, write garbage,
exit, stall) and reports every packet it receives on stderr, which the manager relays to
observers: the tests see the switch's decisions end to end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from norouter_trio import manager as manager_mod
from norouter_trio.frames import TYPE_L3, FrameDecoder, encode_frame
from norouter_trio.manager import HostState, Manager, Observer
from norouter_trio.manifest import load_manifest
from norouter_trio.routing import LEARNED_MAX, RoutingTable, ip_bytes

HERE = Path(__file__).parent
FAKE = str(HERE / "fake_agent.py")
ROOT = str(HERE.parent)
WAIT = 15.0  # bound on any single wait (the machine is shared and slow at times)


class Recorder(Observer):
    """Lifecycle and stderr events (not per-frame ones: the switch stays on its fast path)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._changed = trio.Event()

    def _add(self, *ev: Any) -> None:
        self.events.append(ev)
        self._changed.set()
        self._changed = trio.Event()

    def agent_configured(self, host: HostState, features: list[str], version: str) -> None:
        self._add("configured", host.name)

    def agent_warning(self, host: HostState, msg: str) -> None:
        self._add("warning", host.name, msg)

    def agent_exited(self, host: HostState, code: int | None, lines: list[str]) -> None:
        self._add("exited", host.name, code)

    def agent_stderr(self, host: HostState, line: str) -> None:
        self._add("stderr", host.name, line)

    def route_learned(self, ips: list[str], via: str) -> None:
        self._add("learned", tuple(ips), via)

    async def wait_for(self, pred: Callable[[tuple[Any, ...]], bool]) -> tuple[Any, ...]:
        with trio.fail_after(WAIT):
            seen = 0
            while True:
                for ev in self.events[seen:]:
                    if pred(ev):
                        return ev
                seen = len(self.events)
                await self._changed.wait()

    async def recv(self, host: str, src: str, dst: str, tag: str) -> None:
        await self.wait_for(lambda e: e == ("stderr", host, f"recv {src} {dst} {tag}"))

    def received(self, tag: str) -> list[str]:
        return [e[1] for e in self.events
                if e[0] == "stderr" and e[2].startswith("recv ") and e[2].endswith(" " + tag)]


class PacketRecorder(Recorder):
    """Also per-frame events: puts the switch on its observed path."""

    def frame_switched(self, src_host: HostState, dst_host: HostState, packet: bytes) -> None:
        self._add("switched", src_host.name, dst_host.name, bytes(packet[16:20]))

    def frame_dropped(self, src_host: HostState, reason: str, packet: bytes) -> None:
        self._add("dropped", src_host.name, reason)


@pytest.fixture
def fifos(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def make(name: str) -> str:
        path = str(tmp_path / f"{name}.ctl")
        os.mkfifo(path)
        made.append(path)
        return path

    yield make


def fake_cmd(*extra: str) -> str:
    return "[" + ", ".join(f'"{a}"' for a in (sys.executable, FAKE, *extra)) + "]"


class Control:
    """Writes commands to the fake agents' FIFOs (opened lazily, without blocking trio)."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    async def __call__(self, fifo: str, line: str) -> None:
        f: Any = self._files.get(fifo)
        if f is None:
            with trio.fail_after(WAIT):
                f = await trio.to_thread.run_sync(lambda: open(fifo, "w"))  # noqa: SIM115
            self._files[fifo] = f
        f.write(line + "\n")
        f.flush()

    def close(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()


@contextlib.asynccontextmanager
async def running(manifest_text: str, observer: Observer, **kw: Any
                  ) -> AsyncIterator[tuple[Manager, Control]]:
    manager = Manager(load_manifest(manifest_text), grace=1.0, **kw)
    manager.add_observer(observer)
    control = Control()
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        try:
            yield manager, control
        finally:
            control.close()
            manager.stop()
            with trio.fail_after(WAIT):
                await manager.done.wait()


async def all_ready(rec: Recorder, names: list[str]) -> None:
    for n in names:
        await rec.wait_for(lambda e, n=n: e == ("configured", n))  # type: ignore[misc]


def three_hosts(fa: str, fb: str, fc: str, extra_b: str = "") -> str:
    return f"""
hosts:
  a:
    vip: 127.0.42.101
    cmd: {fake_cmd("--control", fa)}
  b:
    vip: 127.0.42.102
    cmd: {fake_cmd("--control", fb, *extra_b.split())}
  c:
    vip: 127.0.42.103
    cmd: {fake_cmd("--control", fc)}
routes:
  - via: b
    to: ["198.18.0.0/16"]
  - via: 127.0.42.103
    to: ["198.18.5.0/24"]
"""


A, B, C = "127.0.42.101", "127.0.42.102", "127.0.42.103"


@pytest.mark.parametrize("observed", [False, True], ids=["fast-path", "observed-path"])
async def test_switching_by_destination(fifos: Callable[[str], str], observed: bool) -> None:
    fa, fb, fc = fifos("a"), fifos("b"), fifos("c")
    rec: Recorder = PacketRecorder() if observed else Recorder()
    async with running(three_hosts(fa, fb, fc), rec) as (manager, ctl):
        await all_ready(rec, ["a", "b", "c"])
        # (1) VIPs
        await ctl(fa, f"send {B} t1")
        await rec.recv("b", A, B, "t1")
        await ctl(fb, f"send {A} t2")
        await rec.recv("a", B, A, "t2")
        # (3) CIDR routes, the later one winning where they overlap
        await ctl(fa, "send 198.18.1.1 t3")
        await rec.recv("b", A, "198.18.1.1", "t3")
        await ctl(fa, "send 198.18.5.5 t4")
        await rec.recv("c", A, "198.18.5.5", "t4")
        # no owner: dropped and counted, and the link keeps working
        await ctl(fa, "send 10.1.2.3 t5")
        await ctl(fa, "short")
        await ctl(fa, "v6")
        await ctl(fa, "unknown")
        await ctl(fa, f"send {C} t6")
        await rec.recv("c", A, C, "t6")
        a = manager.host("a")
        assert a.drops == {"no_route": 1, "bad_packet": 2, "unknown_type": 1}
        assert rec.received("t5") == []
        # (2) learned routes beat CIDR routes
        await ctl(fc, f"suggest 198.18.1.1 {C}")
        await rec.wait_for(lambda e: e == ("learned", ("198.18.1.1",), C))
        assert manager.learned_routes() == [("198.18.1.1", C)]
        await ctl(fa, "send 198.18.1.1 t7")
        await rec.recv("c", A, "198.18.1.1", "t7")
        assert rec.received("t7") == ["c"]
        b = manager.host("b")
        assert b.frames_out >= 2 and b.state == "ready"
        snap = manager.snapshot()
        assert [h["state"] for h in snap["hosts"]] == ["ready"] * 3
        assert snap["hosts"][0]["counters"]["drops"]["no_route"] == 1
        if observed:
            assert ("switched", "a", "b", ip_bytes(B)) in rec.events
            assert ("dropped", "a", "no_route") in rec.events


async def test_agent_that_dies_and_agent_that_sends_garbage(
        fifos: Callable[[str], str], caplog: pytest.LogCaptureFixture) -> None:
    fa, fb, fc = fifos("a"), fifos("b"), fifos("c")
    rec = Recorder()
    caplog.set_level(logging.INFO, logger="norouter_trio")
    async with running(three_hosts(fa, fb, fc), rec) as (manager, ctl):
        await all_ready(rec, ["a", "b", "c"])
        await ctl(fb, "exit 3")
        await rec.wait_for(lambda e: e == ("exited", "b", 3))
        await ctl(fc, "garbage")
        await rec.wait_for(lambda e: e[:2] == ("exited", "c"))
        # a keeps working: its packets to the dead hosts are dropped and counted
        await ctl(fa, f"send {B} t1")
        await ctl(fa, f"send {A} t2")
        await rec.recv("a", A, A, "t2")
        assert manager.host("a").drops.get("host_down") == 1
        assert manager.host("b").state == "exited"
        assert manager.host("c").exit_reason is not None
        assert "sent garbage" in manager.host("c").exit_reason  # type: ignore[operator]
    text = caplog.text
    assert re.search(r"b\(127\.0\.42\.102\): agent exited \(exit code 3", text)
    assert re.search(r"c\(127\.0\.42\.103\): bad frame stream from c\(127\.0\.42\.103\) "
                     r"at byte offset \d+: magic byte", text)


@pytest.mark.parametrize("observed", [False, True], ids=["fast-path", "observed-path"])
async def test_a_stuck_agent_does_not_stall_the_others(fifos: Callable[[str], str],
                                                       observed: bool) -> None:
    fa, fb, fc = fifos("a"), fifos("b"), fifos("c")
    rec: Recorder = PacketRecorder() if observed else Recorder()
    async with running(three_hosts(fa, fb, fc), rec, queue_bytes=1 << 20) as (manager, ctl):
        await all_ready(rec, ["a", "b", "c"])
        await ctl(fb, "stall")
        await ctl(fa, f"flood {B} 200")  # 12 MB for an agent that reads nothing
        await ctl(fa, f"send {C} after-flood")
        await rec.recv("c", A, C, "after-flood")
        b = manager.host("b")
        assert b.drops.get("queue_full", 0) > 0
        assert b.queued_bytes <= 1 << 20
        assert b.congested
        if observed:
            assert ("dropped", "a", "queue_full") in rec.events


async def test_a_slow_agent_slows_its_sender_instead_of_losing(
        fifos: Callable[[str], str]) -> None:
    fa, fb, fc = fifos("a"), fifos("b"), fifos("c")
    rec = Recorder()
    async with running(three_hosts(fa, fb, fc), rec, queue_bytes=1 << 20) as (manager, ctl):
        await all_ready(rec, ["a", "b", "c"])
        # 12 MB in one write, 12 times the queue: b logs each packet, so it is slower
        await ctl(fa, f"flood {B} 200")
        await ctl(fa, f"send {B} last")
        await rec.recv("b", A, B, "last")
        assert len(rec.received("flood")) == 200
        assert manager.host("b").drops == {}


# -- large frames (spliced pipe to pipe) and small ones, in order, intact ------------------

#: A peer that checks what the switch delivers: ``send PLAN`` answers the configure request
#: and writes the planned frames (per destination numbered 0, 1, 2 ...) in odd-sized writes
#: ``pace`` seconds apart;
#: ``recv STALL,AFTER`` answers, reads AFTER bytes, then nothing for STALL seconds; it parses
#: every frame, checks
#: its IPv4 length and that each sender's numbers go up by one (``skip`` after a drop), and
#: after 1.5 s without data prints ``got N gaps G bad B``.
PEER = r"""
import json, os, select, socket, struct, sys, time
HDR = struct.Struct(">IHH")
def frame(t, p):
    return HDR.pack((0x42 << 24) | (len(p) + 4), t, 0) + p
def write(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
buf = b""
while True:  # the configure request
    buf += os.read(0, 1 << 16)
    if len(buf) >= 8 and len(buf) >= 4 + (HDR.unpack_from(buf)[0] & 0xFFFFFF):
        break
end = 4 + (HDR.unpack_from(buf)[0] & 0xFFFFFF)
req = json.loads(buf[8:end])
buf = buf[end:]
me = req["body"]["args"]["me"]
write(frame(2, json.dumps({"type": "result", "body": {
    "request_id": req["body"]["id"], "op": "configure",
    "data": {"features": ["tcp", "dns"], "version": sys.argv[3]}}}).encode()))
if sys.argv[1] == "send":
    seq = {}
    out = []
    plan = json.loads(sys.argv[2])
    for dst, size, n in plan["frames"]:
        for _ in range(n):
            k = seq[dst] = seq.get(dst, -1) + 1
            body = struct.pack(">I", k) + bytes(size - 24)
            out.append(frame(1, struct.pack(">BBHHHBBH4s4s", 0x45, 0, size & 0xFFFF, 0, 0, 64,
                                          253, 0, socket.inet_aton(me), socket.inet_aton(dst))
                             + body))
    data = b"".join(out)
    step = 0
    while data:
        step = step % 7 + 1
        n = 37 * step ** 5  # 37 bytes .. 600 KB: frames cut anywhere
        write(data[:n])
        data = data[n:]
        time.sleep(plan["pace"])
    sys.stderr.write("sent\n")
    time.sleep(3600)
stall, pause_after = map(float, sys.argv[2].split(","))
got = gaps = bad = nbytes = 0
last = {}
while True:
    if stall and nbytes >= pause_after:
        time.sleep(stall)
        stall = 0
    while len(buf) >= 8:
        word, ftype, _ = HDR.unpack_from(buf)
        if word >> 24 != 0x42:
            sys.stderr.write("got %d gaps %d bad stream\n" % (got, gaps))
            sys.exit(3)
        end = 4 + (word & 0xFFFFFF)
        if len(buf) < end:
            break
        pkt, buf = buf[8:end], buf[end:]
        if ftype != 1:
            continue
        src = pkt[12:16]
        k = struct.unpack(">I", pkt[20:24])[0]
        if struct.unpack(">H", pkt[2:4])[0] != len(pkt) & 0xFFFF or k <= last.get(src, -1):
            bad += 1
        gaps += k != last.get(src, -1) + 1
        last[src] = k
        got += 1
    if not select.select([0], [], [], 1.5)[0]:
        break
    data = os.read(0, 1 << 16)
    if not data:
        break
    nbytes += len(data)
    buf += data
sys.stderr.write("got %d gaps %d bad %d\n" % (got, gaps, bad))
time.sleep(3600)
"""


async def run_peers(tmp_path: Path, plan: list[tuple[str, int, int]], pace: float, stall: str,
                    queue_bytes: int) -> tuple[Manager, dict[str, tuple[int, int, int]]]:
    """A sends ``plan`` to B and C (which pause as ``stall`` says); their ``got`` lines."""
    from norouter_trio import __version__

    script = tmp_path / "peer.py"
    script.write_text(PEER)

    def cmd(*args: str) -> str:  # a YAML flow sequence (JSON is one)
        return json.dumps([sys.executable, str(script), *args, __version__])

    text = f"""
hosts:
  a: {{vip: {A}, cmd: {cmd("send", json.dumps({"frames": plan, "pace": pace}))}}}
  b: {{vip: {B}, cmd: {cmd("recv", stall)}}}
  c: {{vip: {C}, cmd: {cmd("recv", stall)}}}
"""
    rec = Recorder()
    got: dict[str, tuple[int, int, int]] = {}
    async with running(text, rec, queue_bytes=queue_bytes) as (manager, _ctl):
        for name in ("b", "c"):
            ev = await rec.wait_for(lambda e, n=name: e[:2] == ("stderr", n)  # type: ignore[misc]
                                    and e[2].startswith("got "))
            words = ev[2].split()
            got[name] = (int(words[1]), int(words[3]), int(words[5]))
    return manager, got


@pytest.mark.parametrize(("pace", "stall", "queue_bytes"), [
    (0.0, "0,0", 8 << 20), (0.0, "0.8,0", 8 << 20), (0.01, "0.8,1500000", 8 << 20),
    (0.0, "1.5,0", 1 << 20)],
    ids=["fast", "late-reader", "pausing-reader", "late-reader-small-queue"])
async def test_large_and_small_frames_arrive_whole_and_in_order(
        tmp_path: Path, pace: float, stall: str, queue_bytes: int) -> None:
    """Runs of 64 KiB frames are spliced, the rest copied; a destination that stops
    reading makes a splice wait for room (and hand the rest of its frames to the queue)."""
    plan = [(B, 65535, 30), (C, 1500, 40), (B, 65535, 3), (C, 65535, 20), (B, 100, 5),
            (B, 40000, 10), (B, 65535, 40)]
    manager, got = await run_peers(tmp_path, plan, pace, stall, queue_bytes)
    a, b, c = manager.host("a"), manager.host("b"), manager.host("c")
    sent = {B: sum(n for d, _, n in plan if d == B), C: sum(n for d, _, n in plan if d == C)}
    assert a.frames_in == sum(sent.values()) + 1  # and the configure result
    for h, vip in ((b, B), (c, C)):
        n, gaps, bad = got[h.name]
        assert bad == 0
        assert n == h.frames_out  # every frame written reached the agent whole
        assert n + h.drops.get("queue_full", 0) == sent[vip]
        if queue_bytes == 8 << 20:  # all of it fits in the queue: nothing is lost
            assert (n, gaps) == (sent[vip], 0), h.drops
    if queue_bytes == 1 << 20:
        # The small queue overflows while b sleeps. Where the lost frames fall (a gap in
        # the middle, or the tail) depends on timing; the accounting above is exact.
        assert b.drops.get("queue_full", 0) > 0
        assert got["b"][0] < sent[B]


def l3_frame(src: str, dst: str, seq: int, size: int) -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size & 0xFFFF, 0, 0, 64, 253, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return encode_frame(TYPE_L3, ip + struct.pack(">I", seq) + bytes(size - 24))


async def test_a_splice_into_a_full_pipe_hands_the_rest_to_the_queue(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The switch's reader and writer on bare pipes: b's agent reads nothing at first, so
    the splice of a run of large frames fills its pipe, waits, and leaves the rest of the
    run (cut anywhere) to b's writer, which sends it first."""
    monkeypatch.setattr(manager_mod, "SPLICE_WAIT", WAIT)  # no race with the writer
    monkeypatch.setattr(manager_mod, "BACKPRESSURE_WAIT", 0.1)
    monkeypatch.setattr(manager_mod, "READ_SIZE", 1 << 17)  # the first read ends mid-frame
    text = f"hosts:\n  a: {{vip: {A}, cmd: [x]}}\n  b: {{vip: {B}, cmd: [x]}}\n"
    manager = Manager(load_manifest(text))
    a, b = manager.host("a"), manager.host("b")
    a_out_r, a_out_w = os.pipe()
    b_in_r, b_in_w = os.pipe()
    manager_mod._raise_pipe_size(a_out_r)
    fcntl.fcntl(b_in_w, manager_mod.F_SETPIPE_SZ, 1 << 18)  # b's pipe takes 4 frames
    b.stdin = manager_mod.Pipe(b_in_w)
    b.send, recv = trio.open_memory_channel[tuple[list[bytes | memoryview], int, int]](64)
    manager._live[ip_bytes(B)] = b
    count = 15
    data = b"".join(l3_frame(A, B, i, 65535) for i in range(count))
    got: list[int] = []
    # All of it is in a's pipe before the reader starts: its first read ends inside the
    # second frame, whose rest is in the pipe, so it splices and stays in splice mode; the
    # next run (13 frames) fills b's pipe.
    assert os.write(a_out_w, data) == len(data)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager._writer, b, recv)
            nursery.start_soon(manager._reader, a, manager_mod.Pipe(a_out_r), trio.Event())
            with trio.fail_after(WAIT):  # the splice gave up waiting for room
                while "b(127.0.42.102): its queue stays full" not in caplog.text:
                    await trio.sleep(0.01)
            assert b.drops == {}
            decoder = FrameDecoder("b")
            os.set_blocking(b_in_r, False)
            with trio.fail_after(WAIT):
                while len(got) < count:
                    await trio.lowlevel.wait_readable(b_in_r)
                    for ftype, payload in decoder.feed(os.read(b_in_r, 1 << 20)):
                        assert ftype == TYPE_L3 and len(payload) == 65535
                        got.append(struct.unpack(">I", payload[20:24])[0])
                while b.stdin.busy:  # the writer counts what it wrote
                    await b.stdin.wait_released()
            nursery.cancel_scope.cancel()
    finally:
        for fd in (a_out_w, b_in_r):
            os.close(fd)
    assert got == list(range(count))
    assert (a.frames_in, b.frames_out, b.bytes_out) == (count, count, len(data))
    assert b.queued_bytes == 0 and not b.tail


async def test_refusals_and_warnings(fifos: Callable[[str], str]) -> None:
    text = f"""
hosts:
  notcp:
    vip: 127.0.42.101
    cmd: {fake_cmd("--features", "loopback")}
  noloopdisable:
    vip: 127.0.42.102
    cmd: {fake_cmd("--features", "tcp,dns")}
    loopback: {{disable: true}}
  old:
    vip: 127.0.42.103
    cmd: {fake_cmd("--features", "tcp,dns", "--version", "0.0.1")}
"""
    rec = Recorder()
    async with running(text, rec) as (manager, _ctl):
        await rec.wait_for(lambda e: e[:2] == ("exited", "notcp"))
        await rec.wait_for(lambda e: e[:2] == ("exited", "noloopdisable"))
        await all_ready(rec, ["old"])
        assert "tcp" in (manager.host("notcp").exit_reason or "")
        assert "loopback.disable" in (manager.host("noloopdisable").exit_reason or "")
        assert any(e[0] == "warning" and e[1] == "old" and "0.0.1" in e[2]
                   for e in rec.events)


async def test_bad_command_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    text = """
hosts:
  ghost:
    vip: 127.0.42.101
    cmd: ["/nonexistent/norouter"]
"""
    manager = Manager(load_manifest(text), grace=1.0)
    manager.add_observer(rec)
    with trio.fail_after(WAIT):
        code = await manager.run()
    assert code == 1  # every agent gone: nothing left to switch
    assert "ghost(127.0.42.101): cannot start '/nonexistent/norouter'" in caplog.text


# -- whole-program shutdown: Ctrl-C / SIGTERM / SIGKILL, no agent left behind ---------------


def alive(pid: int) -> bool:
    """Running and not a zombie (an exited child the new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def wait_dead(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(WAIT):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def start_cli(tmp_path: Path, manifest: str) -> tuple[trio.Process, dict[str, int],
                                                            list[str]]:
    path = tmp_path / "m.yaml"
    path.write_text(manifest)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "norouter_trio", "manager", str(path)],
        stderr=subprocess.PIPE, env=env)
    pids: dict[str, int] = {}
    lines: list[str] = []
    ready = 0
    buf = b""
    assert proc.stderr is not None
    with trio.fail_after(WAIT):
        while ready < 2 or len(pids) < 2:
            data = await proc.stderr.receive_some(65536)
            assert data, "manager exited early:\n" + "\n".join(lines)
            buf += data
            *new, buf = buf.split(b"\n")
            for raw in new:
                line = raw.decode()
                lines.append(line)
                m = re.search(r"stderr\[(\w+)\(.*\)\]: pid (\d+)", line)
                if m:
                    pids[m.group(1)] = int(m.group(2))
                ready += "Ready: 127.0.42." in line
    return proc, pids, lines


TWO_AGENTS = f"""
hosts:
  a:
    vip: 127.0.42.101
    cmd: {fake_cmd()}
  b:
    vip: 127.0.42.102
    cmd: {fake_cmd("--ignore-sigint", "--linger")}
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_signal_stops_everything_with_exit_0(tmp_path: Path, sig: int) -> None:
    proc, pids, _ = await start_cli(tmp_path, TWO_AGENTS)
    assert all(alive(p) for p in pids.values())
    proc.send_signal(sig)
    with trio.fail_after(5.0):  # b ignores SIGINT and EOF: killed after the grace period
        code = await proc.wait()
    assert code == 0
    assert proc.stderr is not None
    stderr = b""
    with trio.fail_after(WAIT):
        while chunk := await proc.stderr.receive_some(1 << 16):
            stderr += chunk
    assert b"b(127.0.42.102): agent still running" in stderr
    for pid in pids.values():
        await wait_dead(pid)
        assert not alive(pid)


async def test_killed_manager_takes_its_agents_along(tmp_path: Path) -> None:
    proc, pids, _ = await start_cli(tmp_path, TWO_AGENTS)
    proc.kill()
    await proc.wait()
    for pid in pids.values():
        await wait_dead(pid)
        assert not alive(pid)


# -- the routing table on its own ------------------------------------------------------------


def owner(t: RoutingTable, ip: str) -> str | None:
    r = t.resolve(ip_bytes(ip))
    return None if r is None else ".".join(map(str, r))


def test_routing_order_vip_learned_cidr_self() -> None:
    t = RoutingTable(["127.0.42.100", "127.0.42.101", "127.0.42.150"])
    t.add_cidr_route("198.18.0.0/16", "127.0.42.150")
    t.add_cidr_route("198.18.5.0/24", "127.0.42.101")  # later wins on overlap
    assert owner(t, "127.0.42.101") == "127.0.42.101"
    assert owner(t, "198.18.1.1") == "127.0.42.150"
    assert owner(t, "198.18.5.9") == "127.0.42.101"
    assert owner(t, "10.0.0.1") is None
    t.learn(["198.18.1.1", "10.0.0.1"], "127.0.42.100")
    assert owner(t, "198.18.1.1") == "127.0.42.100"
    assert owner(t, "10.0.0.1") == "127.0.42.100"
    t.learn(["127.0.42.101"], "127.0.42.100")  # a VIP is never overridden
    assert owner(t, "127.0.42.101") == "127.0.42.101"


def test_learned_routes_are_an_lru_of_512() -> None:
    t = RoutingTable(["127.0.42.100"])
    t.learn(["10.0.0.0"], "127.0.42.100")
    ips = [f"10.1.{i // 256}.{i % 256}" for i in range(LEARNED_MAX)]
    t.learn(ips[:-1], "127.0.42.100")
    t.resolve(ip_bytes("10.0.0.0"))  # a lookup makes it the most recently used
    t.learn(ips[-1:], "127.0.42.100")  # the 513th entry evicts the oldest: ips[0]
    table = dict(t.learned())
    assert len(table) == LEARNED_MAX
    assert "10.0.0.0" in table and ips[0] not in table


def test_a_new_cidr_route_clears_cached_decisions() -> None:
    t = RoutingTable(["127.0.42.100", "127.0.42.101"])
    assert owner(t, "198.19.0.1") is None
    t.add_cidr_route("198.19.0.0/16", "127.0.42.101")
    assert owner(t, "198.19.0.1") == "127.0.42.101"
    assert t.cidr_routes() == [("198.19.0.0/16", "127.0.42.101")]


async def test_small_frames_go_straight_into_an_idle_pipe_and_the_rest_waits_its_turn(
) -> None:
    """The reader writes frames itself when b's queue is empty and its pipe idle; what the
    pipe does not take (cut mid-frame) heads b's queue, and later frames queue behind it
    even once the pipe has room, so b gets every byte once, in order."""
    text = f"hosts:\n  a: {{vip: {A}, cmd: [x]}}\n  b: {{vip: {B}, cmd: [x]}}\n"
    manager = Manager(load_manifest(text))
    a, b = manager.host("a"), manager.host("b")
    a_out_r, a_out_w = os.pipe()
    b_in_r, b_in_w = os.pipe()
    os.set_blocking(b_in_r, False)
    pipe_size = fcntl.fcntl(b_in_w, manager_mod.F_SETPIPE_SZ, 4096)
    b.stdin = manager_mod.Pipe(b_in_w)
    b.send, recv = trio.open_memory_channel[tuple[list[bytes | memoryview], int, int]](64)
    manager._live[ip_bytes(B)] = b
    first = b"".join(l3_frame(A, B, i, 1000) for i in range(20))
    later = b"".join(l3_frame(A, B, i, 1000) for i in range(20, 23))
    try:
        async with trio.open_nursery() as nursery:
            # No writer task yet: only the reader's own write can put bytes in b's pipe.
            nursery.start_soon(manager._reader, a, manager_mod.Pipe(a_out_r), trio.Event())
            os.write(a_out_w, first)
            with trio.fail_after(WAIT):
                while a.frames_in < 20:
                    await trio.testing.wait_all_tasks_blocked()
            got = os.read(b_in_r, 1 << 20)
            assert got == first[:pipe_size]  # written directly, as far as it fitted
            assert b.queued_bytes == len(first) - pipe_size and b.queue_depth == 1
            assert (b.frames_out, b.bytes_out) == (20, pipe_size)
            # b's pipe has room now, but the rest of the cut frame is queued: these wait.
            os.write(a_out_w, later)
            with trio.fail_after(WAIT):
                while a.frames_in < 23:
                    await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(BlockingIOError):
                os.read(b_in_r, 1 << 20)
            assert b.queued_bytes == len(first) + len(later) - pipe_size
            nursery.start_soon(manager._writer, b, recv)
            want = len(first) + len(later)
            with trio.fail_after(WAIT):
                while len(got) < want:
                    await trio.lowlevel.wait_readable(b_in_r)
                    got += os.read(b_in_r, 1 << 20)
                while b.queued_bytes or b.stdin.busy:
                    await trio.testing.wait_all_tasks_blocked()
            assert got == first + later
            assert (b.frames_out, b.bytes_out, b.drops) == (23, want, {})
            # Idle again: the next frame goes straight in, the queue stays empty.
            os.write(a_out_w, l3_frame(A, B, 23, 100))
            with trio.fail_after(WAIT):
                await trio.lowlevel.wait_readable(b_in_r)
            assert os.read(b_in_r, 1 << 20) == l3_frame(A, B, 23, 100)
            assert b.queue_depth == 0 and b.frames_out == 24
            nursery.cancel_scope.cancel()
    finally:
        for fd in (a_out_w, b_in_r):
            os.close(fd)


async def test_a_pipe_read_yields_once_and_a_cancelled_read_takes_nothing() -> None:
    """``Pipe.read`` on a pipe that always has data still lets other tasks run at every
    call (fairness between links), and cancellation leaves the data in the pipe."""
    r, w = os.pipe()
    pipe = manager_mod.Pipe(r)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            os.write(w, b"x" * 20)
            start = ticks
            for _ in range(10):  # full reads: the pipe is never seen empty
                assert await pipe.read(1) == b"x"
            assert ticks - start >= 5
            with trio.CancelScope() as cs:
                cs.cancel()
                await pipe.read(100)
            assert await pipe.read(100) == b"x" * 10  # short: the next call waits first
            with trio.move_on_after(0.05):
                await pipe.read(100)
                raise AssertionError("read returned from an empty pipe")
            nursery.cancel_scope.cancel()
    finally:
        pipe.close()
        os.close(w)
