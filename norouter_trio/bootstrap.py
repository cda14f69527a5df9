"""Zero-install agents (``bootstrap: true``): the host's cmd only gives a Python interpreter,
and the manager sends norouter itself over the same stdin, before the first frame.

How the loader gets in.  ``python3`` reading a program from a pipe reads until EOF, but the
pipe must stay open for frames, and the cmd is opaque (ssh re-joins its arguments through the
remote shell, docker exec and ``ip netns exec`` do not), so no program text can travel as
an argument.  The manager appends only plain flags that no shell alters::

    CMD -u -B -E -S -q -i

``-i`` makes Python execute stdin statement by statement, as they arrive; ``-u`` makes its C
stdin unbuffered, so it reads exactly the first line and not a byte more; ``-q`` silences
the banner and ``-E -S -B`` keep the host's environment, site-packages and pyc writes out.
Prompts go to stderr (stdout stays clean); the one ``>>> `` written before the loader
line cannot be turned off from inside (it precedes the loader), so the manager strips
prompts from a bootstrap host's stderr lines until its first frame.  The first line on stdin is
``exec('<loader source>')``.  The loader checks the Python version (it is written in plain
syntax so that an old Python gets that far), says ``norouter-bootstrap: loader started`` on
stderr, reads exactly N bytes (the ``agent`` zipapp), checks their sha256, installs an
import finder over the in-memory zip, and runs the agent on the rest of stdin.  Nothing is
written to the host's disk (the agent's own state dir aside: ``stateDir: {disable: true}``).

Failures name the host: the loader reports a too-old Python itself; :class:`BootstrapWatch`
(a manager observer) explains an interpreter that is missing or not Python 3, a command that
wrote a banner on stdout before the loader started, and stops an agent that is not ready
after :data:`READY_TIMEOUT` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import weakref
from dataclasses import dataclass, field

import trio

from norouter_trio.manager import HostState, Manager, Observer
from norouter_trio.manifest import HostSpec
from norouter_trio.zipapp import Zipapp, ZipappError, build_zipapp

__all__ = [
    "BOOTSTRAP_ARGS",
    "READY_TIMEOUT",
    "BootstrapWatch",
    "agent_command",
    "loader_source",
    "preamble",
    "prepare",
]

log = logging.getLogger("norouter_trio.bootstrap")

#: Appended to a bootstrap host's cmd (see the module docstring; all shell-safe).
BOOTSTRAP_ARGS = ("-u", "-B", "-E", "-S", "-q", "-i")
#: Seconds from start to Ready before a bootstrapped agent is given up on.
READY_TIMEOUT = 60.0
MARKER = "norouter-bootstrap:"
_STARTED = MARKER + " loader started"
_ERROR = MARKER + " error:"

# Plain syntax only (no f-strings, no annotations): an old Python must reach the version
# check to say what is wrong.  @NAME@ placeholders are filled in by loader_source().
_LOADER = r'''
import sys, os
def _say(m):
    sys.stderr.write("norouter-bootstrap: " + m + "\n")
    sys.stderr.flush()
def _fail(code, m):
    _say("error: " + m)
    os._exit(code)
_min = @MIN@
_pyv = sys.version.split()[0]
_exe = sys.executable or "python"
if tuple(sys.version_info[:2]) < _min:
    _fail(3, "Python %s (%s) is too old: norouter @VERSION@ needs Python >= @MIN_TEXT@. "
          "Install a newer python3 on this host, or name one in the host's cmd "
          "(e.g. \"ssh HOST -- python3.12\")" % (_pyv, _exe))
_size = @SIZE@
_say("loader started: Python %s (%s), pid %d; receiving norouter @VERSION@ (%d bytes)"
     % (_pyv, _exe, os.getpid(), _size))
_parts = []
_got = 0
while _got < _size:
    _c = os.read(0, min(_size - _got, 1048576))
    if not _c:
        _fail(4, "stdin ended after %d of %d bytes of norouter" % (_got, _size))
    _parts.append(_c)
    _got += len(_c)
_data = b"".join(_parts)
del _parts, _c
import hashlib
if hashlib.sha256(_data).hexdigest() != "@SHA256@":
    _fail(5, "norouter arrived damaged (sha256 mismatch): the command must pass stdin "
          "through unchanged")
import io, re, zipfile, importlib.abc, importlib.machinery, importlib.util
import importlib.metadata

_PREFIX = "<norouter-bootstrap>/"

def _norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()

class _Resources(object):
    def __init__(self, zf, at):
        self.zf = zf
        self.at = at
    def files(self):
        return zipfile.Path(self.zf, self.at)

class _Dist(importlib.metadata.Distribution):
    def __init__(self, zf, info):
        self._zf = zf
        self._info = info
    def read_text(self, filename):
        try:
            return self._zf.read(self._info + str(filename)).decode("utf-8")
        except KeyError:
            return None
    def locate_file(self, path):
        return _PREFIX + str(path)

class _MemImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports modules from the zip in memory; nothing touches the disk."""
    def __init__(self, data):
        self.zip = zipfile.ZipFile(io.BytesIO(data))
        self.names = set(self.zip.namelist())
        self.infos = sorted(n for n in self.names
                            if n.endswith(".dist-info/") and n.count("/") == 1)
    def _find(self, fullname):
        base = fullname.replace(".", "/")
        if base + "/__init__.py" in self.names:
            return base + "/__init__.py", True
        if base + ".py" in self.names:
            return base + ".py", False
        return None, False
    def find_spec(self, fullname, path=None, target=None):
        name, pkg = self._find(fullname)
        if name is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=_PREFIX + name,
                                              is_package=pkg)
        spec.has_location = True
        if pkg:
            spec.submodule_search_locations = [_PREFIX + fullname.replace(".", "/")]
        return spec
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        exec(self.get_code(module.__spec__.name), module.__dict__)
    def is_package(self, fullname):
        return self._find(fullname)[1]
    def get_filename(self, fullname):
        name = self._find(fullname)[0]
        if name is None:
            raise ImportError(fullname)
        return _PREFIX + name
    def get_source(self, fullname):
        name = self._find(fullname)[0]
        if name is None:
            raise ImportError(fullname)
        return importlib.util.decode_source(self.zip.read(name))
    def get_code(self, fullname):
        name = self._find(fullname)[0]
        if name is None:
            raise ImportError(fullname)
        return compile(self.zip.read(name), _PREFIX + name, "exec", dont_inherit=True)
    def get_data(self, path):
        if path.startswith(_PREFIX):
            path = path[len(_PREFIX):]
        try:
            return self.zip.read(path)
        except KeyError:
            raise OSError(2, "not in the bootstrapped norouter", path)
    def get_resource_reader(self, fullname):
        return _Resources(self.zip, fullname.replace(".", "/") + "/")
    def find_distributions(self, context=None):
        want = getattr(context, "name", None)
        for info in self.infos:
            if want is None or _norm(info.split("-")[0]) == _norm(want):
                yield _Dist(self.zip, info)

sys.meta_path.insert(0, _MemImporter(_data))
del _data
sys.argv = ["norouter", "agent", "--automated"]
try:
    from norouter_trio.log import setup_logging
    setup_logging(@DEBUG@, agent=True)
    import logging
    logging.getLogger("norouter_trio.bootstrap").info(
        "bootstrapped agent: norouter @VERSION@ running from memory on Python %s", _pyv)
    from norouter_trio.agent.main import run_agent
    _code = run_agent()
except SystemExit as e:
    _code = e.code if isinstance(e.code, int) else 1
except BaseException:
    import traceback
    traceback.print_exc()
    _code = 1
sys.stderr.flush()
os._exit(_code)
'''


def loader_source(app: Zipapp, *, debug: bool = False) -> str:
    """The loader program for ``app`` (plain Python, any 3.x can parse it)."""
    values = {"MIN": repr(app.min_python), "MIN_TEXT": app.min_python_text.replace("%", "%%"),
              "VERSION": app.version, "SIZE": str(len(app.data)), "SHA256": app.sha256,
              "DEBUG": repr(bool(debug))}
    return re.sub(r"@([A-Z_0-9]+)@",
                  lambda m: values[m.group(1)].replace("\\", "\\\\").replace('"', '\\"'),
                  _LOADER)


def preamble(app: Zipapp, *, debug: bool = False) -> bytes:
    """What goes to stdin before the first frame: one ``exec(...)`` line (ASCII, for the
    interactive interpreter), then the zipapp's bytes (read by the loader)."""
    line = f"exec({loader_source(app, debug=debug)!a})\n".encode("ascii")
    return line + app.data


_build_lock = threading.Lock()
_agent_app: Zipapp | None = None


def _agent_zipapp() -> Zipapp:
    """The agent zipapp, built once per process: concurrent callers (worker threads of
    several bootstrap hosts) wait for the first one's build."""
    global _agent_app
    with _build_lock:
        if _agent_app is None:
            _agent_app = build_zipapp("agent")
        return _agent_app


async def prepare(host: HostSpec) -> None:
    """Build the agent zipapp in a worker thread (packing and compressing takes 0.15-0.65 s
    that the manager's loop must not spend while other agents' frames wait).

    Raises :class:`ZipappError` naming ``host`` when this installation cannot be packed."""
    try:
        await trio.to_thread.run_sync(_agent_zipapp)
    except ZipappError as e:
        raise ZipappError(f"cannot build the agent zipapp that hosts.{host.name} "
                          f"(bootstrap: true) needs: {e}") from e


def agent_command(manager: Manager, host: HostSpec) -> tuple[list[str], bytes]:
    """``Manager.agent_command`` for a ``bootstrap: true`` host: its cmd as written plus
    :data:`BOOTSTRAP_ARGS`, and the loader + zipapp as the stdin preamble."""
    if host.cmd is None:
        raise ValueError(f"hosts.{host.name}: bootstrap needs a cmd")
    app = _agent_zipapp()  # built off the loop by prepare(), unless called without it
    BootstrapWatch.attach(manager)
    return [*host.cmd, *BOOTSTRAP_ARGS], preamble(app, debug=manager.debug)


@dataclass
class _Link:
    settled: trio.Event = field(default_factory=trio.Event)
    loader_started: bool = False
    loader_error: str | None = None
    ready: bool = False
    reported: bool = False


_watches: weakref.WeakKeyDictionary[Manager, BootstrapWatch] = weakref.WeakKeyDictionary()


class BootstrapWatch(Observer):
    """Explains bootstrap failures, naming the host, and enforces :data:`READY_TIMEOUT`."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.links: dict[str, _Link] = {}

    @classmethod
    def attach(cls, manager: Manager) -> BootstrapWatch:
        """The manager's watch, added as an observer the first time."""
        watch = _watches.get(manager)
        if watch is None:
            watch = _watches[manager] = cls(manager)
            manager.add_observer(watch)
        return watch

    def agent_starting(self, host: HostState, argv: list[str]) -> None:
        if not (host.spec.bootstrap and host.spec.cmd is not None):
            return
        link = self.links[host.name] = _Link()
        self.manager.nursery.start_soon(self._deadline, host, link)

    def agent_stderr(self, host: HostState, line: str) -> None:
        link = self.links.get(host.name)
        if link is None:
            return
        if _STARTED in line:
            link.loader_started = True
        elif _ERROR in line and link.loader_error is None:
            link.loader_error = line[line.index(_ERROR) + len(_ERROR):].strip()

    def agent_configured(self, host: HostState, features: list[str], version: str) -> None:
        link = self.links.get(host.name)
        if link is not None:
            link.ready = True
            link.settled.set()

    def agent_exited(self, host: HostState, code: int | None,
                     last_stderr_lines: list[str]) -> None:
        link = self.links.get(host.name)
        if link is None:
            return
        link.settled.set()
        # The manager has no public "stopping" flag yet; its private one says whether this
        # exit was asked for (Ctrl-C) rather than a failure worth explaining.
        stopping = bool(getattr(self.manager, "_stopping", False))
        if link.ready or link.reported or stopping:
            return  # worked, already explained, or stopped on purpose
        link.reported = True
        log.error("%s: %s", host.label, self.diagnose(host, link, code, last_stderr_lines))

    def diagnose(self, host: HostState, link: _Link, code: int | None,
                 lines: list[str]) -> str:
        """One sentence on why a bootstrap failed, and what to do."""
        where = f"hosts.{host.name}.cmd"
        need = "a Python 3 interpreter (e.g. `ssh user@host -- python3`)"
        reason = host.exit_reason or ""
        tail = " | ".join(x for x in lines[-3:] if x.strip())
        tail = f" (last stderr: {tail})" if tail else ""
        if link.loader_error:
            return f"bootstrap failed on that host: {link.loader_error}"
        if "bad frame stream" in reason and not host.frames_in:
            first = re.search(r"magic byte is 0x([0-9a-f]{2})", reason)
            ch = chr(int(first.group(1), 16)) if first else ""
            shown = f" (it starts with {ch!r})" if ch.isprintable() and ch else ""
            return (f"its command wrote text on stdout before the norouter loader started"
                    f"{shown}: a login banner, a motd or a shell startup file (~/.bashrc, "
                    f"~/.profile) printing something? stdout must stay clean for frames: "
                    f"make those print only for interactive shells, or to stderr")
        if not link.loader_started:
            if any("Unknown option" in x for x in lines):
                return (f"the interpreter in {where} is not Python 3 (it rejected the flags "
                        f"{' '.join(BOOTSTRAP_ARGS)}); bootstrap needs {need}{tail}")
            if code == 127 or any(("not found" in x or "No such file" in x) for x in lines):
                return (f"the interpreter in {where} was not found on that host: install "
                        f"python3 there or fix the cmd; bootstrap needs {need}{tail}")
            how = "exited" if code is not None else "stopped"
            return (f"the command {how} ({_describe(code)}) before the norouter loader "
                    f"started; with bootstrap: true, {where} must end with {need}, which "
                    f"gets the flags {' '.join(BOOTSTRAP_ARGS)} appended{tail}")
        return (f"the bootstrapped agent exited ({_describe(code)}) before it was ready; "
                f"see its stderr above{tail}")

    async def _deadline(self, host: HostState, link: _Link) -> None:
        with trio.move_on_after(READY_TIMEOUT):
            await link.settled.wait()
            return
        proc = host.process
        if link.ready or proc is None or proc.poll() is not None:
            return
        link.reported = True
        if link.loader_started:
            why = ("the loader started but the agent did not answer: a very slow link, or "
                   "the command does not pass stdin through; see its stderr")
        else:
            why = ("the norouter loader never started: the command must end with a Python "
                   "3 interpreter reading stdin (a password prompt, a `python3 -` or a "
                   "command that is not Python would wait here)")
        log.error("%s: no frame from the bootstrapped agent after %.0f s: %s; stopping it",
                  host.label, READY_TIMEOUT, why)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)


def _describe(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
