"""A throwaway OpenSSH server for tests: Debian's /usr/sbin/sshd on 127.0.0.1 inside a
network namespace, with its own host key and client key in a temporary directory.

Root may log in with the client key only.  ``SshServer.ssh(...)`` gives the client argv
(run inside the same namespace), with host-key checking off and no user config.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from netns import Netns

SSHD = "/usr/sbin/sshd"
PORT = 2222
START_TIMEOUT = 15.0


def require_sshd() -> None:
    """Skip the calling test unless OpenSSH (server, client, ssh-keygen) is installed."""
    for tool in (SSHD, "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs OpenSSH ({tool} not found)")


@dataclass
class SshServer:
    ns: Netns
    port: int
    client_key: Path
    log: list[str] = field(default_factory=list)  # sshd's stderr, for failure messages

    def ssh(self, *remote: str, user: str = "root") -> list[str]:
        """argv running ``remote`` (joined by ssh, run by the remote shell) over ssh."""
        return self.ns.argv([
            "ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.client_key),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
            f"{user}@127.0.0.1", "--", *remote])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "norouter-test",
                    "-f", str(path)], check=True, timeout=30)


@contextlib.contextmanager
def sshd(ns: Netns, workdir: Path) -> Iterator[SshServer]:
    """Run sshd in ``ns`` until the block ends; files go to ``workdir`` (absolute)."""
    require_sshd()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    _keygen(workdir / "host_key")
    _keygen(workdir / "client_key")
    shutil.copy(workdir / "client_key.pub", workdir / "authorized_keys")
    config = workdir / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress 127.0.0.1:{PORT}",
        f"HostKey {workdir / 'host_key'}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
        "PidFile none",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "LogLevel INFO",
        "",
    ]))
    proc = ns.popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = SshServer(ns=ns, port=PORT, client_key=workdir / "client_key")
    try:
        _wait_listening(proc, server.log)
        assert proc.stderr is not None
        drain = threading.Thread(target=_drain, args=(proc.stderr, server.log), daemon=True)
        drain.start()
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_listening(proc: subprocess.Popen[bytes], log: list[str]) -> None:
    """Read sshd's stderr until it says it listens (bounded by START_TIMEOUT)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    deadline = time.monotonic() + START_TIMEOUT
    pending = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"sshd did not start within {START_TIMEOUT} s: {log}")
            if not sel.select(left):
                continue
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"sshd exited (code {proc.wait()}): {log}")
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                log.append(line.decode(errors="replace"))
                if b"Server listening on" in line:
                    os.set_blocking(fd, True)
                    return


def _drain(stream: object, log: list[str]) -> None:
    with contextlib.suppress(OSError, ValueError):
        for line in stream:  # type: ignore[attr-defined]
            log.append(line.decode(errors="replace").rstrip())
