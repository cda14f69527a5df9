"""Linux network namespaces as test hosts.

Every namespace made here is deleted again, with every process still inside it killed,
even when the test fails. Names carry the pid so parallel or crashed runs never clash.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

_counter = itertools.count()


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and Path("/dev/net/tun").exists()


def require_netns() -> None:
    """Skip the calling test unless it can make namespaces (root + iproute2)."""
    if not netns_available():
        pytest.skip("needs root and iproute2 for network namespaces")


@dataclass
class Netns:
    name: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            **kw: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(argv), check=check, timeout=timeout, **kw)  # type: ignore[call-overload]

    def sh(self, script: str, *, check: bool = True, timeout: float = 60) -> str:
        out = subprocess.run(self.argv(["sh", "-c", script]), check=check, timeout=timeout,
                             capture_output=True, text=True)
        return out.stdout

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(argv), **kw)  # type: ignore[call-overload]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


def _delete(name: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), sig)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    etc = Path("/etc/netns") / name
    if etc.exists():
        shutil.rmtree(etc, ignore_errors=True)


def create(prefix: str = "nrt") -> Netns:
    """Make a namespace with `lo` up and 127.0.0.0/8 routable (route_localnet)."""
    name = f"{prefix}-{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    ns = Netns(name)
    try:
        ns.run(["ip", "link", "set", "lo", "up"])
        ns.run(["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"])
    except BaseException:
        _delete(name)
        raise
    return ns


@contextlib.contextmanager
def namespaces(*prefixes: str) -> Iterator[list[Netns]]:
    """Create one namespace per prefix; delete them all on exit, whatever happened."""
    made: list[Netns] = []
    try:
        for p in prefixes:
            made.append(create(p))
        yield made
    finally:
        for ns in made:
            _delete(ns.name)


def veth(a: Netns, a_addr: str, b: Netns, b_addr: str) -> None:
    """Join two namespaces with a veth pair; addresses in CIDR form (e.g. 198.18.0.1/24)."""
    ia, ib = f"va{next(_counter)}", f"vb{next(_counter)}"
    subprocess.run(["ip", "link", "add", ia, "netns", a.name, "type", "veth",
                    "peer", "name", ib, "netns", b.name], check=True)
    a.run(["ip", "addr", "add", a_addr, "dev", ia])
    b.run(["ip", "addr", "add", b_addr, "dev", ib])
    a.run(["ip", "link", "set", ia, "up"])
    b.run(["ip", "link", "set", ib, "up"])
