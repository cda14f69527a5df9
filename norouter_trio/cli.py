"""The ``norouter`` command (cyclopts): manager, agent, show-example (behaviour.md §7)."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import cyclopts
from cyclopts import Parameter

from norouter_trio import __version__
from norouter_trio.log import setup_logging

if TYPE_CHECKING:
    from norouter_trio.manager import Manager

log = logging.getLogger("norouter_trio.cli")

#: ``--relay`` with no address: loopback and a free port (the URL is logged).
DEFAULT_RELAY_ADDR = "127.0.0.1:0"
#: What may follow ``--relay`` as its value: HOST:PORT, :PORT, PORT, an IPv4 address or
#: "localhost" (anything else is the manifest FILE).
_ADDR_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[\w.\-]*):\d+$|^\d+$|^\d+\.\d+\.\d+\.\d+$"
                      r"|^localhost$")

app = cyclopts.App(
    name="norouter",
    help="IP over stdio: join hosts reachable only through a shell (ssh, docker exec, "
         "kubectl exec) into one virtual network. `norouter FILE` runs the manager.",
    version=f"norouter version {__version__}",
    version_flags=["--version", "-v"],
    help_format="plaintext",
    result_action="return_value",
)

_state: dict[str, bool] = {"debug": False}


@app.meta.default
def _launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    debug: Annotated[bool, Parameter(negative=(), help="Log debug messages.")] = False,
) -> Any:
    _state["debug"] = debug
    return app(tokens, result_action="return_value")


def _fail(msg: str, code: int = 2) -> int:
    print(f"norouter: error: {msg}", file=sys.stderr)
    return code


def _load(path: str) -> Any:
    """Load and validate a manifest; ManifestError / OSError become one-line errors."""
    from norouter_trio.manifest import load_manifest

    return load_manifest(Path(path))


def _manifest_errors() -> tuple[type[BaseException], ...]:
    from norouter_trio.manifest import ManifestError

    return (ManifestError, OSError)


def _editor_argv(path: str) -> list[str]:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    return [*shlex.split(editor), path]


def _edit_manifest(file: str | None) -> tuple[Any, str] | int:
    """``--open-editor``: edit FILE (or a temporary copy of the example) until it is valid."""
    from norouter_trio.manifest import example_text

    if file is None:
        fd, path = tempfile.mkstemp(prefix="norouter-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(example_text())
    else:
        path = file
    while True:
        argv = _editor_argv(path)
        try:
            code = subprocess.call(argv)
        except OSError as e:
            return _fail(f"cannot run the editor {argv[0]!r} ($VISUAL / $EDITOR): {e.strerror}")
        if code != 0:
            return _fail(f"the editor {argv[0]!r} exited with code {code}; not starting")
        try:
            return _load(path), path
        except _manifest_errors() as e:
            print(f"norouter: error: {e}", file=sys.stderr)
            if not sys.stdin.isatty():
                return 2
            try:
                answer = input("Edit again? [Y/n] ").strip().lower()
            except EOFError:
                return 2
            if answer not in ("", "y", "yes"):
                return 2


def _run_manager(file: str | None, relay: str | None, open_editor: bool) -> int:
    if open_editor:
        edited = _edit_manifest(file)
        if isinstance(edited, int):
            return edited
        manifest, file = edited
    elif file is None:
        return _fail("missing manifest FILE (see `norouter show-example`, or use -e)")
    else:
        try:
            manifest = _load(file)
        except _manifest_errors() as e:
            return _fail(str(e))
    if relay is not None:
        try:
            from norouter_trio.relay.server import run_relay  # noqa: F401
        except ImportError as e:
            return _fail(f"--relay: the debug relay is not available in this build ({e})")
    setup_logging(_state["debug"])
    import trio

    from norouter_trio.manager import Manager

    manager = Manager(manifest, debug=_state["debug"])
    try:
        code: int = trio.run(_serve, manager, relay)
    except Exception as e:
        leaf = _only_leaf(e)
        if isinstance(leaf, OSError):  # e.g. the relay's address is taken
            return _fail(str(leaf), code=1)
        raise
    return code


def _only_leaf(e: BaseException) -> BaseException:
    """The single exception inside (possibly nested) exception groups, else ``e``."""
    while True:
        inner = getattr(e, "exceptions", None)
        if not inner or len(inner) != 1:
            return e
        e = inner[0]


async def _serve(manager: Manager, relay: str | None) -> int:
    """Run the manager (and the relay) until a signal or all agents exit.

    The relay listens and attaches its observer before the first agent starts, so the
    debug view sees every agent from its start (and a taken address fails fast)."""
    import trio

    async with trio.open_nursery() as outer:
        outer.start_soon(_watch_signals, manager)
        if relay is not None:
            from norouter_trio.relay.server import run_relay

            await outer.start(run_relay, manager, relay)
        await outer.start(manager.run)
        await manager.done.wait()
        outer.cancel_scope.cancel()
    return manager.exit_code


async def _watch_signals(manager: Manager) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            name = signal.Signals(signum).name
            if count == 1:
                log.info("got %s: stopping the agents", name)
                manager.stop()
            else:
                log.warning("got %s again: killing the agents", name)
                manager.stop(force=True)


def _preprocess(argv: list[str]) -> list[str]:
    """Let ``--relay`` stand without a value: it then means the default address."""
    out: list[str] = []
    for i, tok in enumerate(argv):
        if tok == "--relay":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or not _ADDR_RE.match(nxt):
                out.append(f"--relay={DEFAULT_RELAY_ADDR}")
                continue
        out.append(tok)
    return out


_FILE_HELP = "The manifest (YAML); see `norouter show-example`."
_RELAY_HELP = ("Serve the live debug view on ADDR (host:port, default 127.0.0.1 and a free "
               "port; the URL is logged). `--relay` alone uses the default.")
_EDITOR_HELP = ("Edit the manifest in $VISUAL / $EDITOR (else vi) before running: FILE, or a "
                "temporary copy of the example. It is validated before anything starts.")


@app.default
def _default(
    file: Annotated[str | None, Parameter(help=_FILE_HELP)] = None,
    *,
    relay: Annotated[str | None, Parameter(help=_RELAY_HELP)] = None,
    open_editor: Annotated[bool, Parameter(name=["--open-editor", "-e"], negative=(),
                                           help=_EDITOR_HELP)] = False,
) -> int:
    """Run the manager for FILE (same as `norouter manager FILE`)."""
    return _run_manager(file, relay, open_editor)


@app.command(name="manager", alias="m")
def _manager(
    file: Annotated[str | None, Parameter(help=_FILE_HELP)] = None,
    *,
    relay: Annotated[str | None, Parameter(help=_RELAY_HELP)] = None,
    open_editor: Annotated[bool, Parameter(name=["--open-editor", "-e"], negative=(),
                                           help=_EDITOR_HELP)] = False,
) -> int:
    """Start an agent for every host of the manifest and switch packets between them.

    Ctrl-C or SIGTERM stops the agents and exits 0.
    """
    return _run_manager(file, relay, open_editor)


@app.command(name="agent")
def _agent(
    *,
    automated: Annotated[bool, Parameter(negative=(), help=(
        "Required: agents speak frames on stdin/stdout and are started by the manager."))]
        = False,
    debug_init_config: Annotated[str | None, Parameter(show=False)] = None,
) -> int:
    """Run an agent: frames on stdin/stdout, logs on stderr (started by the manager)."""
    setup_logging(_state["debug"], agent=True)
    if not automated:
        return _fail("agents are started by the manager (`norouter FILE`), not by hand; "
                     "the manager runs `norouter agent --automated` through each host's cmd",
                     code=1)
    from norouter_trio.agent.main import run_agent

    return run_agent(init_config=debug_init_config)


@app.command(name="show-example", alias="show-ex")
def _show_example() -> int:
    """Print an annotated example manifest."""
    from norouter_trio.manifest import example_text

    sys.stdout.write(example_text())
    return 0


# [installer] `show-installer` (owner: installer/bootstrap, issue 7) ------------------------
@app.command(name="show-installer")
def _show_installer(
    *,
    output: Annotated[str | None, Parameter(help=(
        "Write the zipapp itself to FILE.pyz (run it with python3) instead of printing "
        "the installer."))] = None,
) -> int:
    """Print a sh script that installs this exact version as ~/bin/norouter on another
    host, offline: `norouter show-installer | ssh HOST sh`."""
    from norouter_trio.installer import installer_script
    from norouter_trio.zipapp import ZipappError, write_zipapp

    try:
        if output is not None:
            app = write_zipapp(output)
            print(f"wrote {output}: norouter {app.version} zipapp, {len(app.data)} bytes, "
                  f"needs Python >= {app.min_python_text}", file=sys.stderr)
            return 0
        sys.stdout.write(installer_script())
    except ZipappError as e:
        return _fail(f"cannot pack this installation: {e}", code=1)
    except OSError as e:
        return _fail(f"--output {output}: {e.strerror or e}", code=1)
    return 0
# [/installer] -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``norouter`` command."""
    tokens = _preprocess(list(sys.argv[1:] if argv is None else argv))
    try:
        result = app.meta(tokens, result_action="return_value")
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
