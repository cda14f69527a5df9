"""Time from manager start to `Ready` over ssh: an installed agent vs a bootstrapped one.

    python bench/ready_bench.py [--rounds N]

Needs root (a network namespace) and OpenSSH.  A throwaway sshd runs in a namespace
(tests/sshd.py); `norouter show-installer` installs into a temporary HOME there; then each
round starts a manager with one host, alternating:

* installed:    cmd "ssh ... -- ~/bin/norouter"           (the zipapp, from disk)
* bootstrapped: cmd "ssh ... -- /usr/bin/python3 -I", bootstrap: true
                (loader + agent zipapp sent over stdin, run from memory)

and measures the time from `Manager.run` to the agent's configure result (`Ready`), and, for
the bootstrapped agent, to the loader's "loader started" line on stderr (ssh + Python
start-up).  Building the agent zipapp happens once per manager process and is reported
apart.  Numbers depend on the machine's load; they are printed as measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from netns import namespaces, require_netns  # noqa: E402
from sshd import sshd  # noqa: E402

from norouter_trio import zipapp  # noqa: E402
from norouter_trio.installer import installer_script  # noqa: E402
from norouter_trio.manager import HostState, Manager, Observer  # noqa: E402
from norouter_trio.manifest import load_manifest  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"


class Clock(Observer):
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.loader: float | None = None
        self.ready_at: float | None = None
        self.ready = trio.Event()
        self.exited = trio.Event()

    def agent_stderr(self, host: HostState, line: str) -> None:
        if self.loader is None and "norouter-bootstrap: loader started" in line:
            self.loader = time.perf_counter() - self.t0

    def agent_configured(self, host: HostState, features: list[str], version: str) -> None:
        self.ready_at = time.perf_counter() - self.t0
        self.ready.set()

    def agent_exited(self, host: HostState, code: int | None, lines: list[str]) -> None:
        self.exited.set()


async def one(manifest: str) -> Clock:
    manager = Manager(load_manifest(manifest), grace=1.0)
    clock = Clock()
    manager.add_observer(clock)
    async with trio.open_nursery() as n:
        clock.t0 = time.perf_counter()
        await n.start(manager.run)
        with trio.fail_after(120):
            async with trio.open_nursery() as w:
                async def ready() -> None:
                    await clock.ready.wait()
                    w.cancel_scope.cancel()

                async def died() -> None:
                    await clock.exited.wait()
                    raise RuntimeError("the agent exited before it was ready (see the log)")
                w.start_soon(ready)
                w.start_soon(died)
        manager.stop()
    return clock


def row(name: str, values: list[float]) -> str:
    ms = [v * 1e3 for v in values]
    return (f"{name:<34} {statistics.median(ms):>9.0f} {min(ms):>9.0f} {max(ms):>9.0f}"
            f" {len(ms):>4}")


async def main(rounds: int) -> None:
    require_netns()
    t = time.perf_counter()
    app = zipapp.build_zipapp("agent")
    build_s = time.perf_counter() - t
    script = installer_script()
    with tempfile.TemporaryDirectory() as tmp, namespaces("nrtbench") as (ns,), \
            sshd(ns, Path(tmp) / "ssh") as ssh:
        home = Path(tmp) / "home"
        home.mkdir()
        env = f"HOME={home} PATH=/usr/bin:/bin"
        res = await trio.run_process(ssh.ssh(f"{env} sh"), stdin=script.encode(),
                                     capture_stdout=True, capture_stderr=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"installer failed: {res.stderr.decode()}")
        installed = f"""
hosts:
  inst:
    vip: 127.0.42.31
    cmd: {ssh.ssh(env, f"{home}/bin/norouter")}
    stateDir: {{disable: true}}
    loopback: {{disable: true}}
"""
        booted = f"""
hosts:
  boot:
    vip: 127.0.42.32
    cmd: {ssh.ssh(SYSTEM_PYTHON, "-I")}
    bootstrap: true
    stateDir: {{disable: true}}
    loopback: {{disable: true}}
"""
        inst: list[float] = []
        boot: list[float] = []
        loader: list[float] = []
        for _ in range(rounds):
            c = await one(installed)
            assert c.ready_at is not None
            inst.append(c.ready_at)
            c = await one(booted)
            assert c.ready_at is not None and c.loader is not None
            boot.append(c.ready_at)
            loader.append(c.loader)
    print(f"agent zipapp: {len(app.data) / 1e6:.2f} MB, built in {build_s * 1e3:.0f} ms "
          f"(once per manager); installer script: {len(script) / 1e6:.2f} MB")
    print(f"{'manager start ->':<34} {'median ms':>9} {'min':>9} {'max':>9} {'n':>4}")
    print(row("Ready, installed (~/bin/norouter)", inst))
    print(row("loader started, bootstrapped", loader))
    print(row("Ready, bootstrapped (from memory)", boot))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    trio.run(main, parser.parse_args().rounds)
