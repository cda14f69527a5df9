"""The debug page in a real browser (Debian's headless Chromium, driven by Playwright).

Traffic runs while the page is open; the test looks at what a person would: every host in
the diagram, a flow whose byte count grows, and a pcap download that tcpdump reads. The
screenshot is kept in test-artifacts/ (docs/debug-view.png is taken from it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from norouter_trio.relay.server import Relay, run_relay
from norouter_trio.relay.synthetic import SyntheticManager, TcpConversation

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
HOSTS = {"laptop": "127.0.42.100", "web": "127.0.42.101", "db": "127.0.42.102",
         "bastion": "127.0.42.150"}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or shutil.which("tcpdump") is None,
    reason="needs /usr/bin/chromium and tcpdump",
)


def drive_browser(url: str, hosts: list[str], flow_to: str, filter_word: str, shot: Path,
                  pcap: Path) -> dict[str, Any]:
    """Runs in a worker thread: Playwright's sync API must not share the trio thread."""
    from playwright.sync_api import sync_playwright

    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 900}, accept_downloads=True,
        )
        try:
            page = ctx.new_page()
            page.set_default_timeout(45_000)  # the CI machine may be loaded
            page.goto(url)
            page.wait_for_selector("#conn.live")
            for name in hosts:
                page.wait_for_selector(f'#diagram g.host[data-host="{name}"]')
            found["hosts"] = page.eval_on_selector_all(
                "#diagram g.host", "gs => gs.map(g => g.dataset.host)")
            found["states"] = page.eval_on_selector_all(
                "#diagram g.host rect", "rs => rs.map(r => r.getAttribute('class'))")
            row = f'#flows tbody tr[data-flow$="-{flow_to}"]'
            page.wait_for_selector(row)
            first = int(page.get_attribute(f"{row} td.bytes-out", "data-bytes") or 0)
            deadline = time.monotonic() + 15
            later = first
            while later <= first and time.monotonic() < deadline:
                page.wait_for_timeout(300)  # the page updates once a second
                later = int(page.get_attribute(f"{row} td.bytes-out", "data-bytes") or 0)
            found["bytes"] = (first, later)
            page.wait_for_selector("#packets tbody tr")
            page.fill("#flowfilter", filter_word)
            found["filtered"] = page.eval_on_selector_all(
                "#flows tbody tr", "rs => rs.map(r => r.textContent)")
            page.fill("#flowfilter", "")
            page.click(f'#diagram g.host[data-host="{filter_word}"]')  # a host box filters too
            found["clicked"] = (page.input_value("#flowfilter"), page.input_value("#pcaphost"))
            page.click(f'#diagram g.host[data-host="{filter_word}"]')
            found["unclicked"] = page.input_value("#flowfilter")
            page.click("#pause")
            found["paused"] = page.inner_text("#pktinfo")
            page.click("#pause")
            page.wait_for_timeout(1200)  # one more tick so the rates are not zero
            page.screenshot(path=str(shot))
            with page.expect_download() as dl:
                page.click("#pcapbtn")
            dl.value.save_as(str(pcap))
            bare = ctx.new_page()  # the same page without the token cannot subscribe
            bare.goto(url.split("?")[0])
            found["no_token"] = bare.inner_text("#conn")
        finally:
            ctx.close()
    return found


async def traffic(manager: SyntheticManager, stop: trio.Event) -> None:
    """A long bulk transfer laptop→web plus short connections to db and bastion."""
    bulk = TcpConversation("laptop", HOSTS["laptop"], 40000, "web", HOSTS["web"], 8080)
    for src, dst, p in bulk.handshake():
        manager.switch(src, dst, p)
    port = 41000
    tick = 0
    while not stop.is_set():
        tick += 1
        for src, dst, p in bulk.data(1400) + bulk.data(200, from_client=False):
            manager.switch(src, dst, p)
        if tick % 10 == 0:
            port += 1
            server = "db" if tick % 20 else "bastion"
            short = TcpConversation("web", HOSTS["web"], port, server, HOSTS[server],
                                    5432 if server == "db" else 22)
            for src, dst, p in short.handshake() + short.data(300) + short.close(
                    reset=tick % 30 == 0):
                manager.switch(src, dst, p)
        if tick % 25 == 0:
            manager.drop("bastion", "no_route", bulk.data(10)[0][2])
        with trio.move_on_after(0.05):
            await stop.wait()


async def test_page_in_headless_chromium(nursery: trio.Nursery, tmp_path: Path) -> None:
    manager = SyntheticManager(HOSTS)
    relay: Relay = await nursery.start(partial(run_relay, manager, None))
    manager.start_all()
    for o in manager.observers:
        o.route_learned(["198.18.7.1", "198.18.7.2"], HOSTS["bastion"])
    stop = trio.Event()
    nursery.start_soon(traffic, manager, stop)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "debug-view.png"
    pcap = tmp_path / "download.pcap"
    try:
        with trio.fail_after(120):
            found = await trio.to_thread.run_sync(
                drive_browser, relay.url, list(HOSTS), "127.0.42.101:8080", "db", shot, pcap)
    finally:
        stop.set()
    assert sorted(found["hosts"]) == sorted(HOSTS)
    assert all("ready" in c for c in found["states"])
    first, later = found["bytes"]
    assert 0 < first < later
    assert found["filtered"] and all("db" in row for row in found["filtered"])
    assert "paused" in found["paused"]
    assert found["clicked"] == ("db", "db") and found["unclicked"] == ""
    assert "no token" in found["no_token"]
    assert shot.stat().st_size > 10_000
    out = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert "127.0.42.100.40000 > 127.0.42.101.8080: Flags [S]," in out
    assert "127.0.42.101.8080 > 127.0.42.100.40000: Flags [S.]," in out


async def test_page_on_a_real_manager_with_real_agents(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    """The screenshot in docs/debug-view.png comes from this run (debug-view-real.png)."""
    from test_relay_manager import echo_server, real_manifest

    from norouter_trio.manager import Manager
    from norouter_trio.manifest import load_manifest

    web_port, db_port = await echo_server(nursery), await echo_server(nursery)
    vips = {"laptop": "127.0.42.245", "web": "127.0.42.246", "db": "127.0.42.247"}
    base = 20000 + os.getpid() % 20000
    manager = Manager(load_manifest(real_manifest(vips, {
        "web": f"{base + 1}:127.0.0.1:{web_port}", "db": f"{base + 2}:127.0.0.1:{db_port}"})),
        grace=1.0)
    relay: Relay = await nursery.start(partial(run_relay, manager, None))
    await nursery.start(manager.run)
    stop = trio.Event()

    async def connect(vip: str, port: int) -> trio.SocketStream:
        with trio.fail_after(30):
            while True:  # until the laptop agent's loopback listener is up
                try:
                    return await trio.open_tcp_stream(vip, port)
                except OSError:
                    await trio.sleep(0.2)

    async def exchange(stream: trio.SocketStream, size: int) -> None:
        await stream.send_all(b"q" * size)
        got = 0
        while got < size:
            got += len(await stream.receive_some(65536))

    async def bulk() -> None:
        async with await connect(vips["web"], base + 1) as stream:
            while not stop.is_set():
                await exchange(stream, 30000)
                with trio.move_on_after(0.1):
                    await stop.wait()

    async def short_ones() -> None:
        while not stop.is_set():
            async with await connect(vips["db"], base + 2) as stream:
                await exchange(stream, 500)
            with trio.move_on_after(0.7):
                await stop.wait()

    try:
        nursery.start_soon(bulk)
        nursery.start_soon(short_ones)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "debug-view-real.png"
        pcap = tmp_path / "real.pcap"
        with trio.fail_after(120):
            found = await trio.to_thread.run_sync(
                drive_browser, relay.url, list(vips), f"{vips['web']}:{base + 1}", "db",
                shot, pcap)
    finally:
        stop.set()
        manager.stop()
        with trio.fail_after(15):
            await manager.done.wait()
    assert sorted(found["hosts"]) == sorted(vips)
    first, later = found["bytes"]
    assert 0 < first < later
    assert found["filtered"] and all("db" in row for row in found["filtered"])
    out = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert re.search(rf"{vips['laptop']}\.\d+ > {vips['db']}\.{base + 2}: Flags \[S\],", out)
    assert re.search(rf"{vips['db']}\.{base + 2} > {vips['laptop']}\.\d+: Flags \[S\.\],", out)
