"""State directory (`hosts`, `hostaliases`, README) and the /etc/hosts block.

Programs on the agent's host that do not use the proxies can still reach the other hosts
by name: point `HOSTALIASES` at `hostaliases` (glibc maps a dotless name to
`IP.nip.io`, which public DNS resolves to IP), or use `hosts` with tools that take a hosts
file; with `writeEtcHosts`, /etc/hosts itself gets a marked block. Every failure here is a
warning: the data plane works without these files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from norouter_trio.messages import ConfigureArgs

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "~/.norouter/agent"
ETC_HOSTS = "/etc/hosts"
BACKUP_SUFFIX = ".bak.norouter"
BEGIN_MARK = "# <Added-by-NoRouter>"
END_MARK = "# </Added-by-NoRouter>"

README = """\
This directory is written by the NoRouter agent each time it is configured.

hosts
    The system hosts file (/etc/hosts) with a block that maps every NoRouter host
    name and alias to its virtual IP, between the lines
        {begin}
        {end}
    Use it with tools that accept a hosts file (writeEtcHosts puts the same block
    into /etc/hosts itself).

hostaliases
    "NAME IP.nip.io" for every NoRouter name without a dot (plus the entries of the
    file $HOSTALIASES named when the agent started). With
        export HOSTALIASES={path}/hostaliases
    programs using the C library resolver look NAME up as IP.nip.io, which public
    DNS (nip.io) resolves to IP. Names with a dot cannot be aliased this way: use the
    HTTP or SOCKS proxy, or writeEtcHosts, for those.

Edits to these files are overwritten when the agent is configured again.
"""


def expand_path(path: str | None) -> Path:
    """`~` and `${VAR}` expanded on the agent (default ~/.norouter/agent)."""
    return Path(os.path.expanduser(os.path.expandvars(path or DEFAULT_STATE_DIR)))


def hosts_block(hostname_map: Mapping[str, str]) -> str:
    """The marked block: one `IP NAME` line per name, sorted by name."""
    lines = [BEGIN_MARK, *(f"{ip} {name}" for name, ip in sorted(hostname_map.items())),
             END_MARK]
    return "\n".join(lines) + "\n"


def strip_block(text: str) -> str:
    """`text` without any earlier NoRouter block (an unterminated one runs to the end)."""
    out: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        mark = line.strip()
        if mark == BEGIN_MARK:
            inside = True
        elif mark == END_MARK and inside:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def with_block(text: str, hostname_map: Mapping[str, str]) -> str:
    """Hosts-file `text` with its NoRouter block replaced by the current one."""
    base = strip_block(text)
    if base and not base.endswith("\n"):
        base += "\n"
    return base + hosts_block(hostname_map)


def hostaliases_text(hostname_map: Mapping[str, str], existing: str = "") -> str:
    """`NAME IP.nip.io` per dotless name, after the kept lines of an existing file.

    Existing lines aliasing one of our names are dropped (ours win), so pointing
    $HOSTALIASES at our own file does not pile up duplicates.
    """
    ours = {name: ip for name, ip in sorted(hostname_map.items()) if "." not in name}
    kept = [line for line in existing.splitlines()
            if not (line.split() and line.split()[0] in ours)]
    lines = kept + [f"{name} {ip}.nip.io" for name, ip in ours.items()]
    return "\n".join(lines) + "\n" if lines else ""


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_state_dir(directory: Path, hostname_map: Mapping[str, str], *,
                    etc_hosts: str | os.PathLike[str] = ETC_HOSTS,
                    hostaliases_env: str | None = None) -> None:
    """Write hosts, hostaliases and README into `directory` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        system_hosts = Path(etc_hosts).read_text(errors="replace")
    except FileNotFoundError:
        system_hosts = ""
    existing = ""
    if hostaliases_env:
        try:
            existing = Path(hostaliases_env).read_text(errors="replace")
        except OSError as exc:
            log.warning("state dir: cannot read $HOSTALIASES file %s (%s): not keeping its "
                        "entries", hostaliases_env, exc.strerror or exc)
    _write_atomically(directory / "hosts", with_block(system_hosts, hostname_map))
    _write_atomically(directory / "hostaliases", hostaliases_text(hostname_map, existing))
    _write_atomically(directory / "README", README.format(
        begin=BEGIN_MARK, end=END_MARK, path=directory))


def write_etc_hosts(hostname_map: Mapping[str, str],
                    path: str | os.PathLike[str] = ETC_HOSTS) -> bool:
    """Put the NoRouter block into the hosts file at `path`, in place; True if changed.

    The original is copied once to PATH.bak.norouter. The file is rewritten through the
    same inode (open r+, truncate) because in containers /etc/hosts is a bind mount,
    which a rename cannot replace.
    """
    hosts = Path(path)
    with open(hosts, "r+", encoding="utf-8", errors="surrogateescape") as f:
        original = f.read()
        updated = with_block(original, hostname_map)
        if updated == original:
            return False
        backup = hosts.with_name(hosts.name + BACKUP_SUFFIX)
        if not backup.exists():
            backup.write_text(original, encoding="utf-8", errors="surrogateescape")
        f.seek(0)
        f.write(updated)
        f.truncate()
    return True


def apply_state(args: ConfigureArgs, log: logging.Logger | logging.LoggerAdapter[Any] = log,
                *, etc_hosts: str | os.PathLike[str] = ETC_HOSTS,
                environ: Mapping[str, str] | None = None) -> None:
    """Write the state directory and /etc/hosts block as `args` asks; warn on failure.

    `etc_hosts` is the hosts file read (and written with `writeEtcHosts`); `environ`
    supplies HOSTALIASES (default: the process environment). Never raises OSError.
    """
    env = os.environ if environ is None else environ
    names = dict(args.hostname_map or {})
    if not args.state_dir_disable:
        directory = expand_path(args.state_dir_path)
        try:
            write_state_dir(directory, names, etc_hosts=etc_hosts,
                            hostaliases_env=env.get("HOSTALIASES"))
            log.info("state dir %s written (%d names)", directory, len(names))
        except OSError as exc:
            log.warning("state dir %s not written: %s; set stateDir.pathOnAgent to a writable "
                        "directory or stateDir.disable: true", directory, exc)
    if args.write_etc_hosts:
        try:
            if write_etc_hosts(names, etc_hosts):
                log.info("%s: NoRouter block written (%d names)", etc_hosts, len(names))
        except OSError as exc:
            log.warning("%s not updated: %s; writeEtcHosts needs write access to it (root in "
                        "the container), or set writeEtcHosts: false", etc_hosts, exc)


async def start_statedir(args: ConfigureArgs, stack: object, link: object,
                         nursery: trio.Nursery) -> None:
    """Data-plane hook: apply the state directory / /etc/hosts in a worker thread."""
    del stack, link, nursery
    await trio.to_thread.run_sync(apply_state, args, log)

