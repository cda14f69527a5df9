"""State directory and /etc/hosts block, on temp files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from norouter_trio.agent.statedir import (
    BEGIN_MARK,
    END_MARK,
    apply_state,
    expand_path,
    hostaliases_text,
    with_block,
    write_etc_hosts,
)
from norouter_trio.messages import ConfigureArgs

NAMES = {"web": "127.0.42.101", "nginx": "127.0.42.101", "nginx.example.com": "127.0.42.101",
         "bastion": "127.0.42.150"}
SYSTEM_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"


def args(**kw: object) -> ConfigureArgs:
    base: dict[str, object] = {"me": "127.0.42.101", "hostname_map": dict(NAMES),
                               "state_dir_disable": True}
    base.update(kw)
    return ConfigureArgs(**base)  # type: ignore[arg-type]


@pytest.fixture
def etc_hosts(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "hosts"
    path.parent.mkdir()
    path.write_text(SYSTEM_HOSTS)
    return path


def block_lines() -> list[str]:
    return [BEGIN_MARK, "127.0.42.150 bastion", "127.0.42.101 nginx",
            "127.0.42.101 nginx.example.com", "127.0.42.101 web", END_MARK]


def test_state_dir_files(tmp_path: Path, etc_hosts: Path) -> None:
    previous = tmp_path / "my-hostaliases"
    previous.write_text("# mine\nfoo foo.example.org\nweb stale.example.org\n")
    state = tmp_path / "state"
    apply_state(args(state_dir_disable=False, state_dir_path=str(state)), etc_hosts=etc_hosts,
                environ={"HOSTALIASES": str(previous)})
    hosts = (state / "hosts").read_text()
    assert hosts == SYSTEM_HOSTS + "\n".join(block_lines()) + "\n"
    assert (state / "hostaliases").read_text() == (
        "# mine\nfoo foo.example.org\n"
        "bastion 127.0.42.150.nip.io\nnginx 127.0.42.101.nip.io\nweb 127.0.42.101.nip.io\n")
    readme = (state / "README").read_text()
    assert "HOSTALIASES" in readme and "hosts" in readme and str(state) in readme
    assert etc_hosts.read_text() == SYSTEM_HOSTS  # not asked to write it


def test_state_dir_path_expands_home_and_variables(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NR_TEST_DIR", "custom")
    assert expand_path(None) == tmp_path / "home" / ".norouter" / "agent"
    assert expand_path("~/x/${NR_TEST_DIR}") == tmp_path / "home" / "x" / "custom"
    assert expand_path("$NR_TEST_DIR/y") == Path("custom/y")


def test_default_state_dir_is_under_home(tmp_path: Path, etc_hosts: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    apply_state(args(state_dir_disable=False), etc_hosts=etc_hosts, environ={})
    assert (tmp_path / ".norouter" / "agent" / "hostaliases").exists()


def test_etc_hosts_block_is_written_in_place_and_backed_up_once(etc_hosts: Path) -> None:
    inode = etc_hosts.stat().st_ino
    apply_state(args(write_etc_hosts=True), etc_hosts=etc_hosts)
    assert etc_hosts.read_text() == SYSTEM_HOSTS + "\n".join(block_lines()) + "\n"
    assert etc_hosts.stat().st_ino == inode          # same file: bind mounts survive
    backup = etc_hosts.with_name("hosts.bak.norouter")
    assert backup.read_text() == SYSTEM_HOSTS

    # Reconfigured with other names: the block is replaced, the first backup kept.
    etc_hosts.write_text(etc_hosts.read_text() + "10.0.0.1 added-later\n")
    apply_state(args(write_etc_hosts=True, hostname_map={"db": "127.0.42.103"}),
                etc_hosts=etc_hosts)
    text = etc_hosts.read_text()
    assert text == (SYSTEM_HOSTS + "10.0.0.1 added-later\n"
                    + f"{BEGIN_MARK}\n127.0.42.103 db\n{END_MARK}\n")
    assert text.count(BEGIN_MARK) == 1
    assert backup.read_text() == SYSTEM_HOSTS
    assert etc_hosts.stat().st_ino == inode


def test_unchanged_hosts_file_is_not_rewritten(etc_hosts: Path) -> None:
    assert write_etc_hosts(NAMES, etc_hosts) is True
    mtime = etc_hosts.stat().st_mtime_ns
    assert write_etc_hosts(NAMES, etc_hosts) is False
    assert etc_hosts.stat().st_mtime_ns == mtime


def test_block_replacement_edge_cases() -> None:
    assert with_block("", {"a": "1.2.3.4"}) == f"{BEGIN_MARK}\n1.2.3.4 a\n{END_MARK}\n"
    # no final newline; an old block in the middle; an unterminated old block at the end
    assert with_block("x", {}) == f"x\n{BEGIN_MARK}\n{END_MARK}\n"
    middle = f"a\n{BEGIN_MARK}\n1.1.1.1 old\n{END_MARK}\nb\n"
    assert with_block(middle, {"n": "2.2.2.2"}) == f"a\nb\n{BEGIN_MARK}\n2.2.2.2 n\n{END_MARK}\n"
    assert with_block(f"a\n{BEGIN_MARK}\n1.1.1.1 old\n", {}) == f"a\n{BEGIN_MARK}\n{END_MARK}\n"


def test_hostaliases_only_dotless_names() -> None:
    assert hostaliases_text({"a.b": "1.1.1.1"}) == ""
    assert hostaliases_text({"x": "1.1.1.1"}, "y z\n\n") == "y z\n\nx 1.1.1.1.nip.io\n"


def test_failures_are_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    missing_hosts = tmp_path / "no-such-dir" / "hosts"
    log = logging.getLogger("test.statedir")
    with caplog.at_level(logging.WARNING, logger="test.statedir"):
        apply_state(args(state_dir_disable=False, state_dir_path=str(blocker / "sub"),
                         write_etc_hosts=True), log, etc_hosts=missing_hosts,
                    environ={"HOSTALIASES": str(tmp_path / "missing-aliases")})
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(blocker / "sub") in m and "not written" in m for m in messages), messages
    assert any(str(missing_hosts) in m and "writeEtcHosts" in m for m in messages), messages


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write read-only files")
def test_read_only_hosts_file_is_a_warning(etc_hosts: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    etc_hosts.chmod(0o444)
    with caplog.at_level(logging.WARNING):
        apply_state(args(write_etc_hosts=True), etc_hosts=etc_hosts)
    assert etc_hosts.read_text() == SYSTEM_HOSTS
    assert any("writeEtcHosts" in r.getMessage() for r in caplog.records)
