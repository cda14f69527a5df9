"""The zipapp and the `show-installer` script: reproducible, self-contained, offline, and
clear when python3 is missing, too old, or the script arrives cut off."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import trio
from netns import namespaces, require_netns
from sshd import sshd

from norouter_trio import __version__, zipapp
from norouter_trio.installer import installer_script
from norouter_trio.manager import HostState, Manager, Observer
from norouter_trio.manifest import load_manifest

ROOT = str(Path(__file__).resolve().parent.parent)
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: trio and norouter_trio are not installed there
PYENV = Path("/root/.pyenv/versions")
DONE = f"Successfully installed ~/bin/norouter (version {__version__})"


def python(version: str) -> str | None:
    found = sorted(PYENV.glob(f"{version}*/bin/python{version[0]}"))
    return str(found[-1]) if found else None


def bin_dir(tmp_path: Path, name: str, python3: str | None) -> str:
    """A PATH directory holding only ``python3`` (a link to the given interpreter)."""
    d = tmp_path / name
    d.mkdir()
    if python3:
        (d / "python3").symlink_to(python3)
    return str(d)


def run_installer(script: str, home: Path, path: str, timeout: float = 60
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh"], input=script, text=True, capture_output=True,
                          timeout=timeout, env={"HOME": str(home), "PATH": path})


@pytest.fixture(scope="module")
def script() -> str:
    return installer_script()


def test_zipapp_is_reproducible_and_pure_python() -> None:
    build = zipapp.build_zipapp.__wrapped__
    first, second = build("full"), build("full")
    assert first.data == second.data
    with zipfile.ZipFile(io.BytesIO(first.data)) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert not [n for n in names if n.endswith((".pyc", ".so", ".pyd")) or "__pycache__" in n]
    for top in ("norouter_trio/cli.py", "trio/__init__.py", "cyclopts/__init__.py",
                "yaml/__init__.py", "dns/message.py", "h11/__init__.py", "__main__.py"):
        assert top in names
    assert first.min_python >= zipapp.MIN_PYTHON


def test_zipapp_runs_on_a_python_without_the_package(tmp_path: Path) -> None:
    if subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import trio"],
                      capture_output=True).returncode == 0:
        pytest.skip(f"{SYSTEM_PYTHON} can import trio: it would not prove anything")
    out = tmp_path / "norouter.pyz"
    res = subprocess.run([sys.executable, "-m", "norouter_trio", "show-installer",
                          "--output", str(out)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == zipapp.build_zipapp("full").with_shebang()
    assert os.access(out, os.X_OK)
    version = subprocess.run([SYSTEM_PYTHON, "-I", str(out), "--version"], text=True,
                             capture_output=True, timeout=60)
    assert version.stdout.strip() == f"norouter version {__version__}", version.stderr
    example = subprocess.run([SYSTEM_PYTHON, "-I", str(out), "show-example"], text=True,
                             capture_output=True, timeout=60)  # package data from the zip
    assert "hosts:" in example.stdout, example.stderr
    again = tmp_path / "again.pyz"  # an installed norouter hands on exactly itself
    res = subprocess.run([SYSTEM_PYTHON, "-I", str(out), "show-installer", "--output",
                          str(again)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert again.read_bytes() == out.read_bytes()


def test_installer_installs_offline_into_home(tmp_path: Path, script: str) -> None:
    assert script == installer_script()  # same installation, same bytes
    home = tmp_path / "home"
    home.mkdir()
    res = run_installer(script, home, f"/usr/bin:/bin:{home}/bin")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == DONE
    installed = home / "bin" / "norouter"
    assert installed.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert installed.read_bytes() == zipapp.build_zipapp("full").with_shebang()


def test_installer_without_python3(tmp_path: Path, script: str) -> None:
    res = run_installer(script, tmp_path, bin_dir(tmp_path, "empty", None))
    assert res.returncode == 1
    assert "python3 was not found in PATH" in res.stderr
    assert f"needs Python >= {zipapp.build_zipapp('full').min_python_text.split()[0]}" \
        in res.stderr
    assert not (tmp_path / "bin").exists()


@pytest.mark.parametrize("version", ["2.7", "3.10"])
def test_installer_with_a_too_old_python3(tmp_path: Path, script: str, version: str) -> None:
    old = python(version)
    if old is None:
        pytest.skip(f"no Python {version} on this machine")
    res = run_installer(script, tmp_path, bin_dir(tmp_path, "old", old))
    assert res.returncode == 1
    assert f"is Python {version}" in res.stderr and "needs Python >=" in res.stderr
    assert not (tmp_path / "bin").exists()


def test_installer_cut_off_installs_nothing(tmp_path: Path, script: str) -> None:
    res = run_installer(script[:len(script) // 2], tmp_path, "/usr/bin:/bin")
    assert res.returncode != 0
    assert "payload is damaged" in res.stderr and "Nothing was installed" in res.stderr
    assert not (tmp_path / "bin" / "norouter").exists()


class Ready(Observer):
    def __init__(self) -> None:
        self.ready = trio.Event()

    def agent_configured(self, host: HostState, features: list[str], version: str) -> None:
        self.ready.set()


@pytest.mark.netns
async def test_install_over_ssh_then_run_the_installed_agent(tmp_path: Path,
                                                             script: str) -> None:
    """`norouter show-installer | ssh host sh` into a temporary HOME with only the system
    Python on PATH; then `~/bin/norouter --version`, and the installed agent in a mesh."""
    require_netns()
    home = tmp_path / "home"
    home.mkdir()
    env = f"HOME={home} PATH=/usr/bin:/bin"
    with namespaces("nrtgi") as (ns,), sshd(ns, tmp_path / "ssh") as ssh:
        res = await trio.run_process(ssh.ssh(f"{env} sh"), stdin=script.encode(),
                                     capture_stdout=True, capture_stderr=True, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.decode().strip().splitlines()[-1] == DONE
        res = await trio.run_process(ssh.ssh(f"export {env}; ~/bin/norouter --version"),
                                     capture_stdout=True, capture_stderr=True, check=False)
        assert res.stdout.decode().strip() == f"norouter version {__version__}", res.stderr
        manifest = f"""
hosts:
  inst:
    vip: 127.0.42.21
    cmd: {ssh.ssh(env, f"{home}/bin/norouter")}
    stateDir: {{disable: true}}
"""
        manager = Manager(load_manifest(manifest), grace=1.0)
        obs = Ready()
        manager.add_observer(obs)
        async with trio.open_nursery() as n:
            await n.start(manager.run)
            with trio.fail_after(60):
                await obs.ready.wait()
            manager.stop()
        assert manager.host("inst").version == __version__
