"""`norouter agent --automated`: the configure handshake, the stdio pump, EOF and refusal.

The agent runs as a real subprocess speaking frames.  Most tests give it a stand-in data
plane (an echo: swaps source and destination, suggests a route once, prints a stray line
to stdout) so that they test the entry, not the TCP stack; one test uses the real data
plane when it is importable.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from norouter_trio import __version__
from norouter_trio.agent import features

ROOT = str(Path(__file__).parent.parent)
WAIT = 15.0
HDR = struct.Struct(">IHH")

ECHO_DATAPLANE = r"""
import sys, trio
import norouter_trio.agent.dataplane as dp
from norouter_trio.messages import RouteSuggestion

async def run_dataplane(args, link, *, task_status=trio.TASK_STATUS_IGNORED):
    if args.me == "127.0.42.66":
        raise RuntimeError("cannot bind 127.0.42.66:80")
    task_status.started()
    print("a stray print must not corrupt the frame stream")
    first = True
    async for pkt in link.inbound:
        if first:
            link.send_event(RouteSuggestion(ip=["198.18.0.9"], route=args.me))
            first = False
        await link.outbound.send(pkt[:12] + pkt[16:20] + pkt[12:16] + pkt[20:])

dp.run_dataplane = run_dataplane
from norouter_trio.cli import main
sys.argv[0] = "norouter"
main()
"""


def frame(ftype: int, payload: bytes) -> bytes:
    return HDR.pack((0x42 << 24) | (len(payload) + 4), ftype, 0) + payload


def configure(req_id: int, me: str) -> bytes:
    msg = {"type": "request", "body": {"id": req_id, "op": "configure", "args": {"me": me}}}
    return frame(2, json.dumps(msg).encode())


def packet(src: str, dst: str, tag: bytes) -> bytes:
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tag), 0, 0, 64, 6, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + tag


class AgentProc:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.buf = b""

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(data)

    async def frame(self) -> tuple[int, bytes]:
        assert self.proc.stdout is not None
        with trio.fail_after(WAIT):
            while True:
                if len(self.buf) >= 8:
                    word, ftype, _ = HDR.unpack_from(self.buf)
                    assert word >> 24 == 0x42, self.buf[:16]
                    end = 4 + (word & 0xFFFFFF)
                    if len(self.buf) >= end:
                        payload, self.buf = self.buf[8:end], self.buf[end:]
                        return ftype, payload
                data = await self.proc.stdout.receive_some(1 << 16)
                assert data, "agent closed stdout"
                self.buf += data

    async def json(self) -> dict[str, Any]:
        ftype, payload = await self.frame()
        assert ftype == 2
        msg: dict[str, Any] = json.loads(payload)
        return msg

    async def close_and_wait(self) -> int:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()
        with trio.fail_after(WAIT):
            return await self.proc.wait()


async def start(*args: str, echo: bool = True) -> AgentProc:
    argv = [sys.executable, "-c", ECHO_DATAPLANE] if echo else \
        [sys.executable, "-m", "norouter_trio"]
    proc = await trio.lowlevel.open_process(
        [*argv, "agent", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT})
    return AgentProc(proc)


async def test_configure_then_second_configure_is_an_error() -> None:
    agent = await start("--automated")
    await agent.send(configure(7, "127.0.42.101"))
    res = await agent.json()
    assert res["type"] == "result"
    body = res["body"]
    assert (body["request_id"], body["op"]) == (7, "configure")
    assert "error" not in body
    # Go's encoding leaves an empty list out.
    assert body["data"].get("features", []) == features.features()
    assert body["data"]["version"] == __version__
    await agent.send(configure(8, "127.0.42.101"))
    res2 = await agent.json()
    assert res2["type"] == "result" and res2["body"]["request_id"] == 8
    assert "already configured" in json.dumps(res2["body"]["error"])
    assert "data" not in res2["body"]
    assert await agent.close_and_wait() == 0


async def test_packets_flow_both_ways_and_events_reach_the_manager() -> None:
    agent = await start("--automated")
    await agent.send(configure(1, "127.0.42.101"))
    assert (await agent.json())["body"]["request_id"] == 1
    pkts = [packet("127.0.42.100", "127.0.42.101", b"n%d" % i) for i in range(300)]
    await agent.send(b"".join(frame(1, p) for p in pkts))
    got: list[bytes] = []
    events: list[dict[str, Any]] = []
    while len(got) < len(pkts):
        ftype, payload = await agent.frame()
        if ftype == 2:
            events.append(json.loads(payload))
        else:
            assert ftype == 1
            got.append(payload)
    assert got == [packet("127.0.42.101", "127.0.42.100", b"n%d" % i) for i in range(300)]
    if not events:
        events.append(await agent.json())
    assert events == [{"type": "event", "body": {
        "type": "routeSuggestion", "data": {"ip": ["198.18.0.9"], "route": "127.0.42.101"}}}]
    assert await agent.close_and_wait() == 0


async def test_bad_packets_before_and_after_configure_are_dropped() -> None:
    agent = await start("--automated")
    await agent.send(frame(1, packet("127.0.42.100", "127.0.42.101", b"early")))
    await agent.send(configure(1, "127.0.42.101"))
    assert "data" in (await agent.json())["body"]
    await agent.send(frame(1, b"\x45\x00") + frame(1, b"\x60" + bytes(40)) + frame(9, b"?"))
    await agent.send(frame(1, packet("127.0.42.100", "127.0.42.101", b"late")))
    ftype, payload = await agent.frame()
    if ftype == 2:  # the route suggestion may come first
        ftype, payload = await agent.frame()
    assert (ftype, payload[20:]) == (1, b"late")
    assert await agent.close_and_wait() == 0


async def test_data_plane_failure_is_an_error_result() -> None:
    agent = await start("--automated")
    await agent.send(configure(3, "127.0.42.66"))
    res = await agent.json()
    assert "cannot bind 127.0.42.66:80" in json.dumps(res["body"]["error"])
    # still unconfigured: a corrected configure succeeds
    await agent.send(configure(4, "127.0.42.67"))
    assert "data" in (await agent.json())["body"]
    assert await agent.close_and_wait() == 0


async def test_debug_init_config_starts_configured() -> None:
    agent = await start("--automated", "--debug-init-config", '{"me": "127.0.42.101"}')
    await agent.send(frame(1, packet("127.0.42.100", "127.0.42.101", b"x")))
    ftype, payload = await agent.frame()
    if ftype == 2:  # the stand-in's route suggestion may come first
        ftype, payload = await agent.frame()
    assert (ftype, payload[12:16]) == (1, socket.inet_aton("127.0.42.101"))
    await agent.send(configure(2, "127.0.42.101"))
    while ftype != 2:
        ftype, payload = await agent.frame()
    assert "already configured" in payload.decode()
    assert await agent.close_and_wait() == 0


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "norouter_trio", *args], input=stdin,
                          capture_output=True, timeout=WAIT, env={**os.environ,
                                                                  "PYTHONPATH": ROOT})


def test_eof_on_stdin_is_a_clean_exit() -> None:
    r = run("agent", "--automated")
    assert r.returncode == 0
    assert r.stdout == b""
    assert b"Traceback" not in r.stderr


def test_garbage_on_stdin_ends_with_a_message() -> None:
    r = run("agent", "--automated", stdin=b"GET / HTTP/1.1\r\n\r\n")
    assert r.returncode == 1
    assert b"bad frame stream from manager" in r.stderr and b"offset 0" in r.stderr
    assert b"Traceback" not in r.stderr


def test_without_automated_it_refuses() -> None:
    r = run("agent")
    assert r.returncode != 0
    assert b"started by the manager" in r.stderr


def test_bad_init_config_is_refused() -> None:
    r = run("agent", "--automated", "--debug-init-config", "{not json")
    assert r.returncode == 2
    assert b"--debug-init-config" in r.stderr and b"Traceback" not in r.stderr


async def test_real_data_plane_answers_configure() -> None:
    pytest.importorskip("norouter_trio.tcp.netstack")
    agent = await start("--automated", echo=False)
    args = {"me": "127.0.42.101", "loopback": {"disable": True}, "stateDir": {"disable": True}}
    msg = {"type": "request", "body": {"id": 1, "op": "configure", "args": args}}
    await agent.send(frame(2, json.dumps(msg).encode()))
    res = await agent.json()
    data = res["body"].get("data")
    assert data is not None, res
    assert data.get("features", []) == features.features()
    assert data["version"] == __version__
    assert await agent.close_and_wait() == 0


class RecordingStream:
    """Stands in for stdout: records each write (one write = one syscall in the agent)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.wrote = trio.Event()

    async def send_all(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.wrote.set()


async def test_stdout_writer_batches_queued_packets() -> None:
    from norouter_trio.agent.main import Agent
    from norouter_trio.messages import RouteSuggestion

    agent = Agent(-1, -1)
    link_out = agent._out_send
    n = link_out.statistics().max_buffer_size  # as many as the channel holds
    pkts = [packet("127.0.42.101", "127.0.42.100", b"p%d" % i) for i in range(int(n))]
    for p in pkts:
        link_out.send_nowait(p)
    agent.send_event(RouteSuggestion(ip=["198.18.0.1"], route="127.0.42.101"))
    stream = RecordingStream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._write_stdout, stream)
        with trio.fail_after(WAIT):
            await stream.wrote.wait()
        nursery.cancel_scope.cancel()
    assert len(stream.writes) == 1  # all queued packets and the event: one write
    data = stream.writes[0]
    event = b'{"type":"event","body":{"type":"routeSuggestion","data":{"ip":["198.18.0.1"],' \
            b'"route":"127.0.42.101"}}}'
    assert data == frame(2, event) + b"".join(frame(1, p) for p in pkts)


async def test_stdout_writer_waits_for_room_and_keeps_order() -> None:
    """More than a small pipe holds: writev's partial writes and EAGAIN lose nothing."""
    from norouter_trio.agent.main import Agent, raise_pipe_size

    r, w = os.pipe()
    raise_pipe_size(w, 4096)  # shrink it (best effort) so the writer must wait
    os.set_blocking(w, False)
    agent = Agent(-1, w)
    pkts = [packet("127.0.42.101", "127.0.42.100", bytes(3000) + b"%d" % i) for i in range(100)]
    expected = b"".join(frame(1, p) for p in pkts)

    async def produce() -> None:  # more than the channel holds: waits for the writer
        for p in pkts:
            await agent._out_send.send(p)
        agent._out_send.close()
        agent._wake.close()  # no sender left: the writer ends after the last packet

    got = bytearray()
    reader = trio.lowlevel.FdStream(r)
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent._write_stdout, w)
                nursery.start_soon(produce)
                while len(got) < len(expected):
                    data = await reader.receive_some(1 << 16)
                    assert data
                    got += data
    finally:
        await reader.aclose()
        os.close(w)
    assert bytes(got) == expected
    assert agent.counters["frames_out"] == len(pkts)


async def test_stdin_reader_bounds_the_inbound_queue_in_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The data plane not taking packets stops the reader at INBOUND_BYTES queued (not
    at 1024 packets); taking them lets every packet through, in order."""
    from norouter_trio.agent import main as agent_main

    budget = 64 * 1024
    monkeypatch.setattr(agent_main, "INBOUND_BYTES", budget)
    r, w = os.pipe()
    os.set_blocking(r, False)
    agent = agent_main.Agent(r, -1)
    agent.configured = agent_main.parse_init_config('{"me": "127.0.42.101"}')
    pkts = [packet("127.0.42.100", "127.0.42.101", bytes(8000) + b"%d" % i) for i in range(40)]
    writer = trio.lowlevel.FdStream(w)

    async def feed() -> None:
        await writer.send_all(b"".join(frame(1, p) for p in pkts))
        await writer.aclose()  # EOF: the reader returns once everything is handed over

    got: list[bytes] = []
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent._read_stdin, r)
                nursery.start_soon(feed)
                await trio.testing.wait_all_tasks_blocked()
                queued = agent._in_send.statistics().current_buffer_used
                assert 0 < queued < len(pkts)
                while len(got) < queued:
                    got.append(agent._in_recv.receive_nowait())
                assert sum(map(len, got)) <= budget
                while len(got) < len(pkts):
                    got.append(await agent._in_recv.receive())
    finally:
        os.close(r)
    assert got == pkts
    assert agent.exit_code == 0


def test_sigusr1_logs_the_stack_report() -> None:
    """`kill -USR1` on an agent logs its stack's counters and connections, then it goes on."""
    import select
    import signal
    import time

    init = json.dumps({"me": "127.0.42.101", "loopback": {"disable": True},
                       "stateDir": {"disable": True}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "norouter_trio", "agent", "--automated",
         "--debug-init-config", init],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stderr is not None and proc.stdin is not None
    seen = b""

    def wait_for(word: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + WAIT
        while word not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{word!r} not logged; stderr so far: {seen.decode()!r}"
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 65536)  # type: ignore[union-attr]
                assert chunk, f"agent exited early; stderr: {seen.decode()!r}"
                seen += chunk

    try:
        wait_for(b"data plane up")
        proc.send_signal(signal.SIGUSR1)
        wait_for(b"stack report (SIGUSR1)")
        assert proc.poll() is None
        proc.stdin.close()
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
