"""The debug relay: websocket feed, token/Origin checks, slow clients, pcap download.

Driven by `SyntheticManager` (real IPv4/TCP packets built with struct) so that the relay is
tested on its own; `test_relay_manager.py` drives a real `Manager`.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from norouter_trio.relay.flows import FlowTable
from norouter_trio.relay.observer import RelayObserver
from norouter_trio.relay.pcap import merged, pcap_bytes
from norouter_trio.relay.server import Relay, RelayConfig, _is_loopback, parse_addr, run_relay
from norouter_trio.relay.synthetic import SyntheticManager, TcpConversation, conversations

HOSTS = {"alpha": "127.0.42.101", "beta": "127.0.42.102", "gamma": "127.0.42.103"}


async def http_get(
    port: int, target: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET with `Connection: close`; returns (status, body)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def receive_json(ws: WebSocketConnection, timeout: float = 10) -> dict[str, Any]:
    with trio.fail_after(timeout):
        msg = json.loads(await ws.get_message())
    assert isinstance(msg, dict)
    return msg


async def wait_for(ws: WebSocketConnection, mtype: str, timeout: float = 10) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            msg = await receive_json(ws, timeout)
            if msg["type"] == mtype:
                return msg


async def start(nursery: trio.Nursery, manager: Any, **cfg: Any) -> Relay:
    relay: Relay = await nursery.start(
        partial(run_relay, manager, "127.0.0.1:0", config=RelayConfig(**cfg)))
    return relay


def ws_url(relay: Relay, token: str | None = None) -> str:
    return f"ws://127.0.0.1:{relay.port}/ws?token={relay.token if token is None else token}"


def play(manager: SyntheticManager, packets: list[tuple[str, str, bytes]]) -> None:
    for src, dst, p in packets:
        manager.switch(src, dst, p)


def test_parse_addr() -> None:
    assert parse_addr(None) == ("127.0.0.1", 0)
    assert parse_addr("8080") == ("127.0.0.1", 8080)
    assert parse_addr(":8080") == ("127.0.0.1", 8080)
    assert parse_addr("0.0.0.0:9") == ("0.0.0.0", 9)
    assert parse_addr("[::1]:9") == ("::1", 9)
    assert parse_addr("localhost") == ("localhost", 0)
    with pytest.raises(ValueError, match="port"):
        parse_addr("127.0.0.1:http")
    # What decides the loud warning at startup.
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.0.2.1")


def test_flow_states_and_bound() -> None:
    obs = RelayObserver(flow_limit=3)
    m = SyntheticManager(HOSTS)
    m.add_observer(obs)
    conv = TcpConversation("alpha", HOSTS["alpha"], 40000, "beta", HOSTS["beta"], 80)
    hs = conv.handshake()
    play(m, hs[:1])
    assert [f["state"] for f in obs.flows.to_json(0)] == ["syn"]
    play(m, hs[1:])
    play(m, conv.data(100) + conv.data(7, from_client=False))
    (flow,) = obs.flows.to_json(0)
    assert (flow["state"], flow["bytes_out"], flow["bytes_in"]) == ("established", 100, 7)
    assert (flow["src_host"], flow["dst_host"], flow["dport"]) == ("alpha", "beta", 80)
    play(m, conv.close())
    assert obs.flows.to_json(0)[0]["state"] == "closed"
    for c in conversations(m, 5):
        play(m, c.handshake())
    assert len(obs.flows.flows) == 3 and obs.flows.evicted == 3


def test_reset_and_port_reuse() -> None:
    table = FlowTable()
    conv = TcpConversation("x", "127.0.42.1", 1, "y", "127.0.42.2", 2)
    for now, (src, dst, p) in enumerate(conv.handshake()[:1] + conv.close(reset=True)):
        table.update(float(now), src, dst, p, 20, p[33], 0)
    assert table.to_json(2)[0]["state"] == "reset"
    again = TcpConversation("x", "127.0.42.1", 1, "y", "127.0.42.2", 2)  # the port is reused
    src, dst, p = again.handshake()[0]
    table.update(3.0, src, dst, p, 20, p[33], 0)
    (flow,) = table.to_json(3.0)
    assert (flow["state"], flow["age"], flow["packets"]) == ("syn", 0, 1)
    assert (flow["src"], flow["sport"], flow["dst"], flow["dport"]) == (
        "127.0.42.1", 1, "127.0.42.2", 2)


def test_ring_is_bounded_by_bytes() -> None:
    obs = RelayObserver(snaplen=64, ring_packets=1000, ring_bytes=64 * 50)
    m = SyntheticManager(HOSTS)
    m.add_observer(obs)
    conv = TcpConversation("alpha", HOSTS["alpha"], 40000, "beta", HOSTS["beta"], 80)
    for _ in range(200):
        play(m, conv.data(1400)[:1])
    ring = obs.rings["alpha"]
    assert len(ring.packets) == 50 and ring.stored_bytes == 50 * 64
    assert ring.packets[-1][3] == 1440 and ring.packets[0][0] <= ring.packets[-1][0]


def test_packet_log_is_rate_limited_and_keeps_handshakes() -> None:
    obs = RelayObserver(log_rate=10.0, clock=lambda: 5.0)  # one window: 5 entries, 2 for data
    m = SyntheticManager(HOSTS)
    m.add_observer(obs)
    convs = list(conversations(m, 2))
    play(m, convs[0].handshake())
    for _ in range(500):  # a bulk transfer
        play(m, convs[0].data(1000))
    play(m, convs[1].handshake())
    flags = [(p["sport"], p["flags"]) for p in obs.log.take_pending()]
    # Handshakes may use the whole quota; data (and the bare ACKs) only half, already used.
    assert flags == [(40000, "S"), (8080, "SA"), (40001, "S"), (8081, "SA")]
    assert obs.log.not_logged == 1 + 1000 + 1


async def test_refused_without_token_or_with_foreign_origin(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="norouter.relay")
    relay = await start(nursery, SyntheticManager(HOSTS))
    assert f"debug view at {relay.url}" in caplog.text
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{20,}", relay.url)
    for url, headers in [
        (f"ws://127.0.0.1:{relay.port}/ws", None),
        (ws_url(relay, "wrong"), None),
        (ws_url(relay), [("Origin", "http://evil.example")]),
    ]:
        with trio.fail_after(10), pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url, extra_headers=headers):
                pass
        assert info.value.status_code == 403, url
    # A page from a DNS-rebinding name carries a foreign Host (and a matching Origin).
    with trio.fail_after(10):
        sock = await raw_ws_handshake(relay.port, relay.token, host=f"evil.example:{relay.port}")
        head = await sock.recv(1024)
        sock.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    # A broken upgrade (no Sec-WebSocket-Key) is answered 400 by wsproto.
    with trio.fail_after(10):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", relay.port))
        await sock.send(f"GET /ws?token={relay.token} HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode())
        head = await sock.recv(1024)
        sock.close()
    assert head.startswith(b"HTTP/1.1 400"), head
    assert relay.clients == set()
    status, body = await http_get(relay.port, "/pcap")
    assert status == 403 and b"token" in body
    status, _ = await http_get(relay.port, f"/pcap?token={relay.token}x")
    assert status == 403
    # The page itself has no secrets and is served without the token.
    status, body = await http_get(relay.port, "/")
    assert status == 200 and b"app.js" in body
    status, body = await http_get(relay.port, "/app.js")
    assert status == 200 and b"WebSocket" in body


async def test_viewer_limit(nursery: trio.Nursery) -> None:
    relay = await start(nursery, SyntheticManager(HOSTS), max_clients=1)
    async with open_websocket_url(ws_url(relay)) as first:
        assert (await receive_json(first))["type"] == "snapshot"
        with trio.fail_after(10), pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(ws_url(relay)):
                pass
        assert info.value.status_code == 503


async def test_snapshot_then_events_while_traffic_runs(nursery: trio.Nursery) -> None:
    m = SyntheticManager(HOSTS)
    relay = await start(nursery, m)
    m.start_all()
    first = TcpConversation("alpha", HOSTS["alpha"], 41000, "beta", HOSTS["beta"], 8080)
    play(m, first.handshake())
    origin = [("Origin", f"http://127.0.0.1:{relay.port}")]
    async with open_websocket_url(ws_url(relay), extra_headers=origin) as ws:
        snap = await receive_json(ws)
        assert snap["type"] == "snapshot"
        assert [h["name"] for h in snap["hosts"]] == list(HOSTS)
        assert {h["state"] for h in snap["hosts"]} == {"ready"}
        assert snap["hosts"][0]["vip"] == HOSTS["alpha"]
        assert [e["event"] for e in snap["events"]][:2] == ["starting", "configured"]
        assert snap["flows"][0]["state"] == "established"
        assert [p["flags"] for p in snap["packets"]] == ["S", "SA", "A"]

        async def traffic() -> None:
            for _ in range(100):
                play(m, first.data(1000) + first.data(10, from_client=False))
                await trio.sleep(0.05)

        nursery.start_soon(traffic)
        packets = await wait_for(ws, "packets")
        assert {p["src_host"] for p in packets["packets"]} <= {"alpha", "beta"}
        assert packets["packets"][0]["dport"] == 8080
        ticks = [await wait_for(ws, "tick") for _ in range(2)]
        sent = [t["flows"][0]["bytes_out"] for t in ticks]
        assert 0 < sent[0] < sent[1]
        alpha = [t["hosts"][0]["counters"] for t in ticks]
        assert alpha[0]["frames_in"] < alpha[1]["frames_in"]
        assert alpha[1]["queue_depth"] == 0
        m.exit("gamma", 3, ["fatal: boom"])
        ev = await wait_for(ws, "agent")
        assert (ev["event"], ev["host"], ev["code"], ev["stderr"]) == (
            "exited", "gamma", 3, ["fatal: boom"])
        for o in m.observers:
            o.route_learned(["198.18.0.7"], HOSTS["beta"])
        ev = await wait_for(ws, "routeSuggestion")
        assert ev["ip"] == ["198.18.0.7"] and ev["route"] == HOSTS["beta"]
        tick = await wait_for(ws, "tick")
        assert {"to": "198.18.0.7", "via": HOSTS["beta"], "kind": "learned"} in tick["routes"]
        assert [h["state"] for h in tick["hosts"]] == ["ready", "ready", "exited"]


async def raw_ws_handshake(port: int, token: str, *, host: str | None = None) -> Any:
    """Send a websocket upgrade by hand (any Host header; a tiny receive buffer)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host = host or f"127.0.0.1:{port}"
    await sock.connect(("127.0.0.1", port))
    await sock.send(
        f"GET /ws?token={token} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


async def stalled_client(port: int, token: str) -> Any:
    """A websocket client that completes the handshake and then never reads."""
    with trio.fail_after(10):
        sock = await raw_ws_handshake(port, token)
        head = await sock.recv(1024)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_stalled_client_loses_events_and_is_dropped(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="norouter.relay")
    m = SyntheticManager(HOSTS)
    relay = await start(nursery, m, queue_size=4, stall_timeout=0.5, send_buffer=4096,
                        tick=0.1, packet_flush=0.05)
    m.start_all()
    convs = list(conversations(m, 200))  # 200 flows: every tick message is ~40 kB
    for c in convs:
        play(m, c.handshake())
    switched = 0
    stop = trio.Event()

    async def switch() -> None:
        nonlocal switched
        while not stop.is_set():
            for c in convs[:20]:
                play(m, c.data(100))
                switched += 2
            await trio.sleep(0.01)

    nursery.start_soon(switch)
    async with open_websocket_url(ws_url(relay)) as good:
        assert (await receive_json(good))["type"] == "snapshot"
        stuck = await stalled_client(relay.port, relay.token)
        try:
            with trio.fail_after(20):
                while relay.clients_dropped == 0:
                    await receive_json(good)  # the healthy client keeps up meanwhile
            before = switched
            ticks = [await wait_for(good, "tick") for _ in range(3)]
            assert switched > before, "the switch kept going"
            assert ticks[-1]["relay"]["clients_dropped"] == 1
            assert ticks[-1]["relay"]["clients"] == 1
        finally:
            stuck.close()
            stop.set()
    lost = re.search(r"dropped client 127\.0\.0\.1:\d+: .* \(lost (\d+) events\)", caplog.text)
    assert lost is not None and int(lost.group(1)) > 0


async def test_slow_client_is_told_what_it_lost(nursery: trio.Nursery) -> None:
    m = SyntheticManager(HOSTS)
    relay = await start(nursery, m, queue_size=2, stall_timeout=10, tick=0.05,
                        packet_flush=0.05, send_buffer=4096)
    for c in conversations(m, 200):  # every tick message is ~40 kB
        play(m, c.handshake())
    async with open_websocket_url(ws_url(relay)) as slow:
        assert (await receive_json(slow))["type"] == "snapshot"
        with trio.fail_after(20):
            while True:
                await trio.sleep(0.3)  # reads far slower than the relay sends
                msg = await receive_json(slow)
                if msg["type"] == "lost":
                    break
        assert msg["count"] > 0
        assert relay.clients_dropped == 0 and len(relay.clients) == 1


async def test_pcap_download_read_by_tcpdump(nursery: trio.Nursery, tmp_path: Path) -> None:
    m = SyntheticManager(HOSTS)
    relay = await start(nursery, m)
    conv = TcpConversation("alpha", HOSTS["alpha"], 42000, "beta", HOSTS["beta"], 8080)
    play(m, conv.handshake() + conv.data(600) + conv.close())
    for payload in ("0", "1"):
        status, body = await http_get(
            relay.port, f"/pcap?token={relay.token}&host=beta&payload={payload}")
        assert status == 200
        path = tmp_path / f"capture{payload}.pcap"
        path.write_bytes(body)
        out = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True,
                             text=True, timeout=30, check=True).stdout.splitlines()
        assert len(out) == 8
        assert "127.0.42.101.42000 > 127.0.42.102.8080: Flags [S]" in out[0]
        assert "127.0.42.102.8080 > 127.0.42.101.42000: Flags [S.]" in out[1]
        assert "length 600" in out[3]
    # Without payload, records stop after the TCP header; with it, up to the snap length.
    assert len(pcap_bytes(list(relay.observer.rings["alpha"].packets), payload=False)) < len(
        pcap_bytes(list(relay.observer.rings["alpha"].packets)))
    status, body = await http_get(relay.port, f"/pcap?token={relay.token}&host=nobody")
    assert status == 200 and len(body) == 24  # a valid, empty capture


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(min_size=20, max_size=120).map(lambda b: bytes([0x40 | b[0] & 0x0F])
                                                           + b[1:9] + bytes([6]) + b[10:])
                | st.binary(max_size=80), max_size=30))
def test_garbage_packets_never_break_the_observer(packets: list[bytes]) -> None:
    """Whatever the agents send, the observer and the messages built from it hold up."""
    obs = RelayObserver(flow_limit=8, snaplen=64)
    for i, p in enumerate(packets):
        if i % 5 == 4:
            obs.frame_dropped("a", "no_route", p)
        else:
            obs.frame_switched("a", "b", p)
    json.dumps(obs.flows.to_json(1.0))
    json.dumps(list(obs.log.recent))
    capture = pcap_bytes(merged(obs.rings.values()), payload=False)
    assert len(capture) >= 24 and len(obs.flows.flows) <= 8
