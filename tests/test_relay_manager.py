"""The relay on a real `Manager` with fake agents (real subprocesses speaking frames)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from norouter_trio.manager import Manager
from norouter_trio.manifest import load_manifest
from norouter_trio.relay.server import Relay, run_relay

FAKE = Path(__file__).with_name("fake_agent.py")
VIP_A, VIP_B = "127.0.42.211", "127.0.42.212"


async def next_of(ws: WebSocketConnection, want: Any, timeout: float = 15) -> dict[str, Any]:
    """The next message for which `want(msg)` is true."""
    with trio.fail_after(timeout):
        while True:
            msg = json.loads(await ws.get_message())
            if want(msg):
                return msg  # type: ignore[no-any-return]


async def test_relay_on_a_real_manager(nursery: trio.Nursery, tmp_path: Path) -> None:
    fifos = {}
    for name in ("a", "b"):
        fifos[name] = tmp_path / f"{name}.ctl"
        os.mkfifo(fifos[name])
    manifest = load_manifest(
        "hosts:\n"
        + "".join(
            f"  {name}:\n    vip: \"{vip}\"\n"
            f"    cmd: [{json.dumps(sys.executable)}, {json.dumps(str(FAKE))}, "
            f"\"--control\", {json.dumps(str(fifos[name]))}, \"--version\", \"0.1.0\"]\n"
            for name, vip in (("a", VIP_A), ("b", VIP_B))
        )
    )
    manager = Manager(manifest, grace=1.0)
    await nursery.start(manager.run)
    relay: Relay = await nursery.start(partial(run_relay, manager, None))
    assert relay.host == "127.0.0.1"
    # Writers for the control FIFOs (opening blocks until the agent opens its end).
    controls = {}
    with trio.fail_after(15):
        for name, path in fifos.items():
            controls[name] = await trio.open_file(path, "w", buffering=1)

    async def command(name: str, line: str) -> None:
        await controls[name].write(line + "\n")

    try:
        async with open_websocket_url(
            f"ws://127.0.0.1:{relay.port}/ws?token={relay.token}"
        ) as ws:
            snap = await next_of(ws, lambda m: m["type"] == "snapshot")
            assert [(h["name"], h["vip"]) for h in snap["hosts"]] == [("a", VIP_A), ("b", VIP_B)]
            if all(h["state"] != "ready" for h in snap["hosts"]):
                await next_of(ws, lambda m: m.get("event") == "configured")
            for i in range(5):
                await command("a", f"send {VIP_B} hello{i}")
            await command("a", "send 198.51.100.9 nowhere")
            tick = await next_of(
                ws, lambda m: m["type"] == "tick" and m["hosts"][0]["counters"]["frames_in"] >= 6
            )
            a, b = tick["hosts"]
            assert a["state"] == b["state"] == "ready"
            assert a["version"] == "0.1.0" and "tcp" in a["features"]
            assert a["argv"][-2:] == ["agent", "--automated"]
            assert a["counters"]["drops"] == {"no_route": 1}
            assert b["counters"]["frames_out"] >= 5 and b["counters"]["queue_depth"] == 0
            logged = [p for p in relay.observer.log.recent if p.get("src") == VIP_A]
            assert {p["dst"] for p in logged} == {VIP_B, "198.51.100.9"}
            assert any(p.get("drop") == "no_route" for p in logged)
            await command("b", f"suggest 198.18.3.4 {VIP_B}")
            ev = await next_of(ws, lambda m: m["type"] == "routeSuggestion")
            assert ev["ip"] == ["198.18.3.4"] and ev["route"] == VIP_B
            tick = await next_of(ws, lambda m: m["type"] == "tick" and "routes" in m
                                 and any(r["to"] == "198.18.3.4" for r in m["routes"]))
            await command("b", "exit 3")
            ev = await next_of(ws, lambda m: m.get("event") == "exited")
            assert ev["host"] == "b" and ev["code"] == 3
            tick = await next_of(ws, lambda m: m["type"] == "tick")
            assert [h["state"] for h in tick["hosts"]] == ["ready", "exited"]
    finally:
        for f in controls.values():
            await f.aclose()
        manager.stop()
        with trio.fail_after(15):
            await manager.done.wait()


def real_manifest(vips: dict[str, str], forwards: dict[str, str]) -> str:
    """Real agents on this machine: the first host is local (loopback mode), the others
    run `python -m norouter_trio` with loopback disabled (they share 127.0.0.0/8)."""
    lines = ["hosts:"]
    for i, (name, vip) in enumerate(vips.items()):
        lines += [f"  {name}:", f"    vip: \"{vip}\"", "    stateDir: {disable: true}"]
        if i:
            lines += [f"    cmd: [{json.dumps(sys.executable)}, \"-m\", \"norouter_trio\"]",
                      "    loopback: {disable: true}"]
        if name in forwards:
            lines.append(f"    ports: [\"{forwards[name]}\"]")
    return "\n".join(lines) + "\n"


async def echo_server(nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_relay_with_real_agents_sees_tcp_flows(nursery: trio.Nursery) -> None:
    echo_port = await echo_server(nursery)
    vips = {"laptop": "127.0.42.241", "web": "127.0.42.242"}
    fwd_port = 20000 + os.getpid() % 20000
    manager = Manager(load_manifest(real_manifest(
        vips, {"web": f"{fwd_port}:127.0.0.1:{echo_port}"})), grace=1.0)
    relay: Relay = await nursery.start(partial(run_relay, manager, None))
    await nursery.start(manager.run)
    try:
        async with open_websocket_url(
            f"ws://127.0.0.1:{relay.port}/ws?token={relay.token}"
        ) as ws:
            ready: set[str] = set()
            with trio.fail_after(60):
                while ready != set(vips):
                    msg = json.loads(await ws.get_message())
                    if msg.get("event") == "configured":
                        ready.add(msg["host"])
                    assert msg.get("event") != "exited", msg
            # laptop's loopback mode listens on the real web VIP:port and joins the stack.
            with trio.fail_after(30):
                stream = await trio.open_tcp_stream(vips["web"], fwd_port)
            async with stream:
                sent = 0

                async def exchange(n: int) -> None:
                    nonlocal sent
                    chunk = b"z" * 20000
                    for _ in range(n):
                        await stream.send_all(chunk)
                        got = 0
                        while got < len(chunk):
                            got += len(await stream.receive_some(65536))
                        sent += len(chunk)

                with trio.fail_after(30):
                    await exchange(5)
                key = (vips["laptop"], vips["web"], fwd_port)

                def flow(m: dict[str, Any]) -> dict[str, Any] | None:
                    for f in m.get("flows", []):
                        if (f["src"], f["dst"], f["dport"]) == key:
                            return f  # type: ignore[no-any-return]
                    return None

                tick = await next_of(ws, lambda m: m["type"] == "tick" and flow(m) is not None
                                     and flow(m)["bytes_out"] >= sent)  # type: ignore[index]
                first = flow(tick)
                assert first is not None
                assert first["state"] == "established"
                assert (first["src_host"], first["dst_host"]) == ("laptop", "web")
                assert first["bytes_in"] >= sent  # the echo
                with trio.fail_after(30):
                    await exchange(5)
                tick = await next_of(ws, lambda m: m["type"] == "tick"
                                     and (flow(m) or {}).get("bytes_out", 0) > first["bytes_out"])
                hosts = {h["name"]: h for h in tick["hosts"]}
                assert hosts["laptop"]["counters"]["frames_in"] > 0
                assert hosts["web"]["counters"]["bytes_out"] >= sent
            tick = await next_of(ws, lambda m: m["type"] == "tick"
                                 and (flow(m) or {}).get("state") in ("fin", "closed"))
            # The handshake is in the capture.
            pcap_packets = [p for ring in relay.observer.rings.values() for p in ring.packets]
            flags = {(p[1], p[4][33]) for p in pcap_packets if p[4][9] == 6
                     and int.from_bytes(p[4][22:24], "big") == fwd_port}
            assert ("laptop", 0x02) in flags
    finally:
        manager.stop()
        with trio.fail_after(15):
            await manager.done.wait()


async def test_cli_relay_logs_a_working_url(tmp_path: Path) -> None:
    """`norouter FILE --relay`: the URL in the log serves the page and the feed."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "hosts:\n"
        + "".join(
            f"  {name}:\n    vip: \"{vip}\"\n"
            f"    cmd: [{json.dumps(sys.executable)}, {json.dumps(str(FAKE))}]\n"
            for name, vip in (("a", "127.0.42.215"), ("b", "127.0.42.216"))
        )
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "norouter_trio", str(manifest), "--relay"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stderr is not None
    log_text = ""
    try:
        with trio.fail_after(30):
            while "debug view at " not in log_text or not log_text.endswith("\n"):
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, f"the manager exited: {log_text}"
                log_text += chunk.decode()
        url = re.search(r"debug view at (http://127\.0\.0\.1:(\d+)/\?token=([\w-]+))", log_text)
        assert url is not None, log_text
        port, token = int(url.group(2)), url.group(3)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
            snap = await next_of(ws, lambda m: m["type"] == "snapshot")
            assert [h["name"] for h in snap["hosts"]] == ["a", "b"]
            await next_of(ws, lambda m: m["type"] == "tick"
                          and all(h["state"] == "ready" for h in m["hosts"]))
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            await proc.wait()
        await proc.stderr.aclose()
