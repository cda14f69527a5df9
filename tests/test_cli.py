"""The `norouter` command: version, help, show-example, manifest errors, --open-editor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from norouter_trio import cli
from norouter_trio.cli import DEFAULT_RELAY_ADDR, _preprocess
from norouter_trio.manifest import example_text

HERE = Path(__file__).parent
ROOT = str(HERE.parent)
FAKE = str(HERE / "fake_agent.py")
WAIT = 15.0
ENV = {**os.environ, "PYTHONPATH": ROOT}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real program, as a subprocess."""
    return subprocess.run([sys.executable, "-m", "norouter_trio", *args], text=True,
                          capture_output=True, timeout=WAIT, env=env or ENV,
                          stdin=subprocess.DEVNULL)


def call(capsys: pytest.CaptureFixture[str], *args: str
         ) -> subprocess.CompletedProcess[str]:
    """``cli.main`` in this process (fast; any exception would fail the test)."""
    with pytest.raises(SystemExit) as ei:
        cli.main(list(args))
    out, err = capsys.readouterr()
    code = ei.value.code
    return subprocess.CompletedProcess(list(args), code if isinstance(code, int) else 1,
                                       out, err)


def test_version_from_the_installed_entry_points() -> None:
    r = run("--version")
    assert (r.returncode, r.stdout) == (0, "norouter version 0.1.0\n")


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    r = call(capsys, flag)
    assert (r.returncode, r.stdout) == (0, "norouter version 0.1.0\n")


@pytest.mark.parametrize(("args", "words"), [
    ([], "norouter FILE"), (["manager"], "switch packets"), (["m"], "switch packets"),
    (["agent"], "started by the manager"), (["show-example"], "example manifest"),
    (["show-ex"], "example manifest")])
def test_help_explains_each_command(capsys: pytest.CaptureFixture[str], args: list[str],
                                    words: str) -> None:
    r = call(capsys, *args, "--help")
    assert r.returncode == 0
    assert words in " ".join(r.stdout.split())


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    out = call(capsys, "--help").stdout
    for word in ("manager", "agent", "show-example", "show-installer", "--debug",
                 "--open-editor", "--relay"):
        assert word in out


@pytest.mark.parametrize("cmd", ["show-example", "show-ex"])
def test_show_example(capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    r = call(capsys, cmd)
    assert r.returncode == 0
    assert r.stdout == example_text()


@pytest.mark.parametrize("prefix", [[], ["manager"], ["m"]])
def test_bad_manifest_names_host_and_field(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           prefix: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("hosts:\n  web:\n    vip: 127.0.42.101\n    ports: ['8080:80']\n")
    r = call(capsys, *prefix, str(path)) if prefix else run(str(path))
    assert r.returncode != 0
    assert "hosts.web.ports[0]" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_manifest_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r = call(capsys, str(tmp_path / "nope.yaml"))
    assert r.returncode != 0
    assert "nope.yaml" in r.stderr and "Traceback" not in r.stderr


def test_no_file_at_all(capsys: pytest.CaptureFixture[str]) -> None:
    r = call(capsys, "manager")
    assert r.returncode != 0 and "show-example" in r.stderr


def test_relay_without_address_uses_the_default() -> None:
    assert _preprocess(["m", "--relay", "x.yaml"]) == ["m", f"--relay={DEFAULT_RELAY_ADDR}",
                                                       "x.yaml"]
    assert _preprocess(["m", "x.yaml", "--relay"]) == ["m", "x.yaml",
                                                       f"--relay={DEFAULT_RELAY_ADDR}"]
    assert _preprocess(["--relay", "127.0.0.1:9000", "x.yaml"]) == [
        "--relay", "127.0.0.1:9000", "x.yaml"]
    assert _preprocess(["--relay", ":9000", "x"]) == ["--relay", ":9000", "x"]
    assert _preprocess(["--relay", "0.0.0.0", "x"]) == ["--relay", "0.0.0.0", "x"]
    assert _preprocess(["--relay", "m.yaml"]) == [f"--relay={DEFAULT_RELAY_ADDR}", "m.yaml"]


def editor(tmp_path: Path, content: str) -> dict[str, str]:
    """An $EDITOR that writes ``content`` into the file it is given."""
    src = tmp_path / "content.yaml"
    src.write_text(content)
    script = tmp_path / "ed.py"
    script.write_text(f"import shutil, sys\nshutil.copy({str(src)!r}, sys.argv[1])\n")
    return {**ENV, "EDITOR": f"{sys.executable} {script}", "VISUAL": ""}


def test_open_editor_validates_before_starting(tmp_path: Path) -> None:
    env = editor(tmp_path, "hosts:\n  web:\n    vip: 300.0.0.1\n")
    r = run("-e", env=env)
    assert r.returncode != 0
    assert "hosts.web.vip" in r.stderr and "Traceback" not in r.stderr
    assert "Ready" not in r.stderr


def test_open_editor_with_a_failing_editor(tmp_path: Path) -> None:
    r = run("--open-editor", env={**ENV, "VISUAL": "false"})
    assert r.returncode != 0 and "editor" in r.stderr


async def test_open_editor_runs_the_edited_manifest(tmp_path: Path) -> None:
    manifest = textwrap.dedent(f"""\
        hosts:
          a:
            vip: 127.0.42.101
            cmd: ["{sys.executable}", "{FAKE}"]
        """)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "norouter_trio", "--open-editor"], stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=editor(tmp_path, manifest))
    assert proc.stderr is not None
    seen = b""
    with trio.fail_after(WAIT):
        while b"Ready: 127.0.42.101" not in seen:
            data = await proc.stderr.receive_some(65536)
            assert data, seen.decode()
            seen += data
    proc.send_signal(signal.SIGINT)
    with trio.fail_after(5.0):
        assert await proc.wait() == 0


def test_relay_address_in_use_is_a_clean_error(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "m.yaml"
    path.write_text(f'hosts:\n  a:\n    vip: 127.0.42.101\n    cmd: ["{sys.executable}", '
                    f'"{FAKE}"]\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("manager", "--relay", f"127.0.0.1:{port}", str(path))
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
