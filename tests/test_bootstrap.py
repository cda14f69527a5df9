"""Zero-install agents (``bootstrap: true``): loader + zipapp over stdin, run from memory.

The mesh test goes through a real OpenSSH server in a namespace, into an interpreter that
cannot import the package (Debian's ``/usr/bin/python3 -I``), with broken hosts beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from netns import namespaces, require_netns
from sshd import sshd

from norouter_trio import bootstrap
from norouter_trio.manager import HostState, Manager, Observer
from norouter_trio.manifest import load_manifest
from norouter_trio.zipapp import build_zipapp, marker_applies

ROOT = str(Path(__file__).resolve().parent.parent)
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: trio and norouter_trio are not installed there
PYENV = Path("/root/.pyenv/versions")
WAIT = 60.0
BLOB = 3 << 20

SERVER = r"""
import hashlib, random, socket, sys
port, seed, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
blob = random.Random(seed).randbytes(size)
srv = socket.create_server(("127.0.0.1", port))
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(blob)
"""
CLIENT = r"""
import hashlib, socket, sys
h = hashlib.sha256()
n = 0
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    while data := s.recv(1 << 16):
        h.update(data)
        n += len(data)
print(n, h.hexdigest())
"""


def python(version: str) -> str | None:
    """A pyenv interpreter of that version, if this machine has one."""
    found = sorted(PYENV.glob(f"{version}*/bin/python{version[0]}"))
    return str(found[-1]) if found else None


def blob_sha(seed: int) -> str:
    return hashlib.sha256(random.Random(seed).randbytes(BLOB)).hexdigest()


class Recorder(Observer):
    def __init__(self) -> None:
        self.ready: dict[str, trio.Event] = {}
        self.exited: dict[str, trio.Event] = {}
        self.stderr: dict[str, list[str]] = {}

    def _event(self, table: dict[str, trio.Event], name: str) -> trio.Event:
        return table.setdefault(name, trio.Event())

    def agent_configured(self, host: HostState, features: list[str], version: str) -> None:
        self._event(self.ready, host.name).set()

    def agent_exited(self, host: HostState, code: int | None, lines: list[str]) -> None:
        self._event(self.exited, host.name).set()

    def agent_stderr(self, host: HostState, line: str) -> None:
        self.stderr.setdefault(host.name, []).append(line)

    async def wait(self, table: str, name: str) -> None:
        with trio.fail_after(WAIT):
            await self._event(getattr(self, table), name).wait()


async def run_manager(text: str, body: Callable[[Manager, Recorder], Any]) -> Manager:
    manager = Manager(load_manifest(text), grace=1.0)
    rec = Recorder()
    manager.add_observer(rec)
    async with trio.open_nursery() as n:
        await n.start(manager.run)
        try:
            await body(manager, rec)
        finally:
            manager.stop()
            with trio.fail_after(15):
                await manager.done.wait()
    return manager


def errors(caplog: pytest.LogCaptureFixture, host: str) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.levelno >= logging.ERROR and r.getMessage().startswith(host + "("))


# --- without ssh: quick checks of the loader ------------------------------------------


def test_marker_evaluation() -> None:
    assert marker_applies('python_version < "3.11"', 10)
    assert not marker_applies('python_version < "3.11"', 11)
    assert not marker_applies('os_name == "nt" and implementation_name != "pypy"', 12)
    assert not marker_applies("extra == 'dev'", 11)
    assert marker_applies("(python_version >= '3.9') and extra != 'dev'", 11)
    with pytest.raises(ValueError):
        marker_applies("python_version <", 11)


def test_preamble_is_one_ascii_line_then_the_zipapp() -> None:
    app = build_zipapp("agent")
    data = bootstrap.preamble(app)
    line, _, rest = data.partition(b"\n")
    assert line.startswith(b"exec(") and line.isascii()
    assert rest == app.data
    names = set(__import__("zipfile").ZipFile(__import__("io").BytesIO(app.data)).namelist())
    assert "norouter_trio/agent/main.py" in names and "trio/__init__.py" in names
    assert not any(n.endswith((".pyc", ".so")) for n in names)


async def test_bootstrap_into_python_that_lacks_the_package(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local ``python3 -I`` without trio gets Ready; a command that never starts the
    loader is stopped after the (shortened) timeout with a clear error."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"needs {SYSTEM_PYTHON}")
    if subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import trio"],
                      capture_output=True).returncode == 0:
        pytest.skip(f"{SYSTEM_PYTHON} can import trio: it would not prove anything")
    monkeypatch.setattr(bootstrap, "READY_TIMEOUT", 3.0)
    old = python("2.7")
    text = f"""
hosts:
  mem:
    vip: 127.0.77.1
    cmd: [{SYSTEM_PYTHON}, "-I"]
    bootstrap: true
    loopback: {{disable: true}}
    stateDir: {{disable: true}}
  hang:
    vip: 127.0.77.2
    cmd: [sh, -c, "exec sleep 30"]
    bootstrap: true
""" + (f"""
  py2:
    vip: 127.0.77.3
    cmd: [{old}]
    bootstrap: true
""" if old else "")

    async def body(manager: Manager, rec: Recorder) -> None:
        await rec.wait("ready", "mem")
        await rec.wait("exited", "hang")
        if old:
            await rec.wait("exited", "py2")
        assert manager.host("mem").state == "ready"

    caplog.set_level(logging.INFO)
    manager = await run_manager(text, body)
    assert any("running from memory" in line for line in manager.host("mem").last_stderr)
    # The interpreter's ">>> " prompt (written before it reads the loader line) is not
    # relayed: the first line is the loader's own.
    relayed = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("stderr[mem(")]
    assert relayed[0].startswith("stderr[mem(127.0.77.1)]: norouter-bootstrap: loader started")
    assert not any(">>> " in line for line in relayed)
    assert "no frame from the bootstrapped agent after 3 s" in errors(caplog, "hang")
    assert "loader never started" in errors(caplog, "hang")
    if old:
        assert "is not Python 3" in errors(caplog, "py2")


async def test_the_zipapp_is_built_once_in_a_worker_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent bootstrap hosts share one build, which runs off the event loop: the fake
    build below only finishes once a trio task has run while it was building."""
    import threading

    app = build_zipapp("agent")
    loop_ran = threading.Event()
    threads: list[threading.Thread] = []

    def slow_build(profile: str) -> Any:
        threads.append(threading.current_thread())
        assert loop_ran.wait(WAIT), "the event loop was blocked during the build"
        return app

    async def tick() -> None:
        await trio.sleep(0)
        loop_ran.set()

    monkeypatch.setattr(bootstrap, "build_zipapp", slow_build)
    monkeypatch.setattr(bootstrap, "_agent_app", None)
    hosts = load_manifest("hosts:\n  a: {vip: 127.0.77.1, cmd: [python3], bootstrap: true}\n"
                          "  b: {vip: 127.0.77.2, cmd: [python3], bootstrap: true}\n").hosts
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            n.start_soon(bootstrap.prepare, hosts["a"])
            n.start_soon(bootstrap.prepare, hosts["b"])
            n.start_soon(tick)
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    manager = Manager(load_manifest("hosts:\n  a: {vip: 127.0.77.1, cmd: [python3], "
                                    "bootstrap: true}\n"))
    assert bootstrap.agent_command(manager, hosts["a"])[1].endswith(app.data)
    assert len(threads) == 1


async def test_a_failed_zipapp_build_names_the_host(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A build that fails (a dependency that cannot be packed) stops that host's link
    with an error naming it; the manager does not crash."""
    from norouter_trio.zipapp import ZipappError

    def broken_build(profile: str) -> Any:
        raise ZipappError("the distribution 'h11' is not installed")

    monkeypatch.setattr(bootstrap, "build_zipapp", broken_build)
    monkeypatch.setattr(bootstrap, "_agent_app", None)
    manager = Manager(load_manifest(
        "hosts:\n  far: {vip: 127.0.77.9, cmd: [python3], bootstrap: true}\n"), grace=1.0)
    with trio.fail_after(WAIT):
        assert await manager.run() == 1
    message = errors(caplog, "far")
    assert "hosts.far (bootstrap: true)" in message and "'h11' is not installed" in message
    assert manager.host("far").state == "exited"


# --- through a real sshd ----------------------------------------------------------------


@pytest.mark.netns
async def test_mesh_with_a_host_bootstrapped_over_ssh(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """a (agent from this checkout, in namespace A) and b (bootstrapped through ssh into
    namespace B): sha256-checked transfers both ways, while hosts with a missing Python,
    a banner before the loader, and a too-old Python fail clearly beside them."""
    require_netns()
    too_old = python("3.10")
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "client.py").write_text(CLIENT)
    caplog.set_level(logging.INFO)
    with namespaces("nrtga", "nrtgb") as (ns_a, ns_b), sshd(ns_b, tmp_path / "ssh") as ssh:
        servers = [ns_a.popen([SYSTEM_PYTHON, str(tmp_path / "server.py"), "9001", "1",
                               str(BLOB)], stdout=subprocess.PIPE),
                   ns_b.popen([SYSTEM_PYTHON, str(tmp_path / "server.py"), "9000", "2",
                               str(BLOB)], stdout=subprocess.PIPE)]
        try:
            for s in servers:
                assert s.stdout is not None and s.stdout.readline() == b"listening\n"
            a_cmd = ns_a.argv(["env", f"PYTHONPATH={ROOT}", sys.executable, "-m",
                               "norouter_trio"])
            old_host = f"""
  oldpy:
    vip: 127.0.42.15
    cmd: {ssh.ssh(too_old)}
    bootstrap: true
""" if too_old else ""
            text = f"""
hostTemplate:
  stateDir: {{disable: true}}
hosts:
  a:
    vip: 127.0.42.11
    cmd: {a_cmd}
    ports: ["8081:127.0.0.1:9001"]
  b:
    vip: 127.0.42.12
    cmd: {ssh.ssh(SYSTEM_PYTHON, "-I")}
    bootstrap: true
    ports: ["8080:127.0.0.1:9000"]
  nopy:
    vip: 127.0.42.13
    cmd: {ssh.ssh("/nonexistent/python3")}
    bootstrap: true
  banner:
    vip: 127.0.42.14
    cmd: {ssh.ssh("echo Welcome to this host;", "exec", SYSTEM_PYTHON)}
    bootstrap: true
""" + old_host

            async def fetch(ns: Any, ip: str, port: int) -> str:
                with trio.fail_after(WAIT):
                    out = await trio.run_process(
                        ns.argv([SYSTEM_PYTHON, str(tmp_path / "client.py"), ip, str(port)]),
                        capture_stdout=True)
                return out.stdout.decode().strip()

            async def body(manager: Manager, rec: Recorder) -> None:
                await rec.wait("ready", "a")
                await rec.wait("ready", "b")
                for name in ("nopy", "banner") + (("oldpy",) if too_old else ()):
                    await rec.wait("exited", name)
                # a -> b: a's loopback listener for b's VIP, b dials its 127.0.0.1:9000
                assert await fetch(ns_a, "127.0.42.12", 8080) == f"{BLOB} {blob_sha(2)}"
                # b -> a: the bootstrapped agent's own listener, a dials 127.0.0.1:9001
                assert await fetch(ns_b, "127.0.42.11", 8081) == f"{BLOB} {blob_sha(1)}"
                assert manager.host("a").state == manager.host("b").state == "ready"

            manager = await run_manager(text, body)
        finally:
            for s in servers:
                s.kill()
                s.wait(timeout=5)
    b_err = list(manager.host("b").last_stderr)
    assert any("running from memory" in line for line in b_err), b_err
    assert "was not found on that host" in errors(caplog, "nopy")
    assert "wrote text on stdout before the norouter loader started (it starts with 'W')" \
        in errors(caplog, "banner")
    if too_old:
        assert "is too old: norouter" in errors(caplog, "oldpy")
    for name in ("a", "b"):
        assert not errors(caplog, name), errors(caplog, name)


def test_ssh_argv_survives_the_remote_shell() -> None:
    """The flags appended to a cmd are plain words: joining and re-splitting them (what ssh
    and the remote shell do) changes nothing."""
    argv = ["python3", "-I", *bootstrap.BOOTSTRAP_ARGS]
    assert shlex.split(" ".join(argv)) == argv


def test_memory_importer_serves_metadata_resources_and_tracebacks() -> None:
    """The loader's finder, with the agent start replaced by checks: importlib.metadata,
    importlib.resources and source lines in tracebacks work from the in-memory zip."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"needs {SYSTEM_PYTHON}")
    app = build_zipapp("agent")
    source = bootstrap.loader_source(app)
    source = source[:source.index('sys.argv = ["norouter"')] + (
        "import importlib.metadata, importlib.resources, traceback, trio\n"
        "print('trio', importlib.metadata.version('trio'), trio.__file__)\n"
        "print('example', 'hosts:' in (importlib.resources.files('norouter_trio')"
        " / 'examples' / 'example.yaml').read_text())\n"
        "from norouter_trio import frames\n"
        "try:\n    frames.FrameDecoder('x').feed(b'garbage!')\n"
        "except Exception:\n    print('trace', traceback.format_exc().count('raise'))\n"
        "sys.stdout.flush()\nos._exit(0)\n")
    stdin = f"exec({source!a})\n".encode() + app.data
    res = subprocess.run([SYSTEM_PYTHON, "-I", *bootstrap.BOOTSTRAP_ARGS], input=stdin,
                         capture_output=True, timeout=60)
    out = res.stdout.decode().splitlines()
    assert out[0].startswith("trio 0.") and "<norouter-bootstrap>/trio/__init__.py" in out[0]
    assert out[1] == "example True"
    assert out[2].startswith("trace ") and int(out[2].split()[1]) >= 1, res.stderr
