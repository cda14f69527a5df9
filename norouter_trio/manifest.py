"""The YAML manifest: load, validate, and derive each agent's configure arguments.

Shape (behaviour.md §4; ``norouter show-example`` prints an annotated one)::

    hostTemplate: {...}        # optional: ports, http, socks, loopback, stateDir,
                               # writeEtcHosts, bootstrap (not vip, cmd or aliases)
    hosts:
      NAME: {vip, cmd, ports, http, socks, loopback, stateDir, aliases, writeEtcHosts,
             bootstrap}
    routes:
      - {via: NAME-or-VIP, to: [CIDR or hostname glob, ...]}

Everything is checked before any agent starts, and every problem found is reported at
once in one :class:`ManifestError`, each line naming the field
(``hosts.web.ports[1]: ...``). Unknown keys are errors, so that a typo cannot pass
silently; duplicate keys in a YAML mapping are errors too (YAML itself would keep the last).

Rules worth knowing:

* ``http``, ``socks``, ``loopback``, ``stateDir``, ``writeEtcHosts`` and ``bootstrap`` set
  on a host replace the template's value as a whole (``stateDir: {pathOnAgent: x}`` on a
  host drops a template's ``disable: true``). A key whose value is null counts as absent.
* ``ports``: the template's come first, then the host's own.
* Names and aliases are compared case-insensitively (they are DNS names).
* ``routes[].via``: a host name, or the VIP of a host (any other address could never be
  delivered to, as only agents own addresses).
"""

from __future__ import annotations

import difflib
import importlib.resources
import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from norouter_trio.messages import DNS_PORT, ConfigureArgs, Forward, IPPortProto, Route

__all__ = [
    "HostSpec",
    "Manifest",
    "ManifestError",
    "PortSpec",
    "RouteSpec",
    "configure_args",
    "example_text",
    "load_manifest",
]

_TOP_KEYS = ("hostTemplate", "hosts", "routes")
_TEMPLATE_KEYS = ("ports", "http", "socks", "loopback", "stateDir", "writeEtcHosts",
                  "bootstrap")
_HOST_ONLY_KEYS = ("vip", "cmd", "aliases")
_HOST_KEYS = ("vip", "cmd", "ports", "http", "socks", "loopback", "stateDir", "aliases",
              "writeEtcHosts", "bootstrap")
_ROUTE_KEYS = ("via", "to")

_PORT_RE = re.compile(
    r"(?P<listen>[0-9]+):(?P<host>[^\s:/]+):(?P<port>[0-9]+)(?:/(?P<proto>[^/]*))?")
_PORT_FORMAT = "LISTEN_PORT:CONNECT_HOST:CONNECT_PORT[/tcp]"
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *anchor` may repeat
_GLOB_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


class ManifestError(ValueError):
    """An invalid manifest. :attr:`errors` holds one line per problem, each starting with
    the field's path (``hosts.NAME.FIELD``); :attr:`source` is the file, if any."""

    def __init__(self, errors: Sequence[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        prefix = f"{source}: " if source else ""
        if len(self.errors) == 1:
            text = prefix + self.errors[0]
        else:
            text = (f"{prefix}{len(self.errors)} errors in the manifest:\n"
                    + "\n".join("  " + e for e in self.errors))
        super().__init__(text)


@dataclass(frozen=True)
class PortSpec:
    """One ``ports`` entry: listen on VIP:listen_port, connect to connect_host:connect_port
    from the agent's host."""

    listen_port: int
    connect_host: str
    connect_port: int
    proto: str = "tcp"


@dataclass
class HostSpec:
    name: str
    vip: str
    # The command as written in the manifest (split); None = the local host, run by the
    # manager itself in agent mode.
    cmd: list[str] | None
    ports: list[PortSpec] = field(default_factory=list)  # template's first
    aliases: list[str] = field(default_factory=list)
    http_listen: str | None = None
    socks_listen: str | None = None
    loopback_disable: bool = False
    state_dir_path: str | None = None
    state_dir_disable: bool = False
    write_etc_hosts: bool = False
    bootstrap: bool = False

    @property
    def is_local(self) -> bool:
        return self.cmd is None

    @property
    def argv(self) -> list[str] | None:
        """What the manager runs to start this host's agent; None for the local host."""
        return None if self.cmd is None else [*self.cmd, "agent", "--automated"]


@dataclass
class RouteSpec:
    via: str  # the VIP packets go to
    via_host: str  # the name of the host owning that VIP
    to_cidr: list[str] = field(default_factory=list)
    to_hostname_glob: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    hosts: dict[str, HostSpec]  # in file order
    routes: list[RouteSpec] = field(default_factory=list)
    source: str | None = None

    def configure_args(self, host_name: str) -> ConfigureArgs:
        return configure_args(self, host_name)


def configure_args(manifest: Manifest, host_name: str) -> ConfigureArgs:
    """The ``configure`` arguments the manager sends to ``host_name``'s agent (§4)."""
    host = manifest.hosts[host_name]
    hosts = list(manifest.hosts.values())
    return ConfigureArgs(
        me=host.vip,
        forwards=[Forward(p.listen_port, p.connect_host, p.connect_port, p.proto)
                  for p in host.ports],
        others=[IPPortProto(other.vip, p.listen_port, p.proto)
                for other in hosts if other is not host for p in other.ports],
        hostname_map={name: h.vip for h in hosts for name in (h.name, *h.aliases)},
        http_listen=host.http_listen,
        socks_listen=host.socks_listen,
        loopback_disable=host.loopback_disable,
        state_dir_path=host.state_dir_path,
        state_dir_disable=host.state_dir_disable,
        write_etc_hosts=host.write_etc_hosts,
        routes=[Route(via=r.via, to_cidr=list(r.to_cidr),
                      to_hostname_glob=list(r.to_hostname_glob)) for r in manifest.routes],
        name_servers=[IPPortProto(h.vip, DNS_PORT, "tcp") for h in hosts],
    )


def example_text() -> str:
    """The annotated example manifest (what ``norouter show-example`` prints)."""
    return (importlib.resources.files("norouter_trio") / "examples" / "example.yaml").read_text(
        encoding="utf-8")


def load_manifest(source: str | bytes | os.PathLike[str]) -> Manifest:
    """Load and validate a manifest from a file path or from YAML text.

    A ``str`` naming an existing file, or one non-blank line with no ``:`` (which cannot be
    a manifest), is read as a path; any other ``str`` or ``bytes`` is the YAML text itself.
    Raises :class:`ManifestError` for anything wrong, unreadable files included.
    """
    label: str | None = None
    if isinstance(source, bytes):
        text = source.decode("utf-8", errors="replace")
    elif isinstance(source, str) and not os.path.isfile(source) and (
            "\n" in source or ":" in source or not source.strip()):
        text = source
    else:
        label = os.fspath(source)
        try:
            with open(label, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError([f"cannot read the manifest: {e}"], label) from None
    return _Parser(label).parse(text)


# --- parsing -----------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _duplicate_keys(text: str) -> list[str]:
    """Duplicate keys in any mapping of the YAML text (safe_load keeps the last silently)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    errors: list[str] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                child = f"{path}.{key}" if path else key
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    ident = (key_node.tag, key)
                    line = key_node.start_mark.line + 1
                    if ident in first_line:
                        errors.append(f"{path or 'manifest'}: duplicate key {_show(key)} "
                                      f"(lines {first_line[ident]} and {line})")
                    else:
                        first_line[ident] = line
                stack.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
    return sorted(errors)


class _Parser:
    def __init__(self, source: str | None) -> None:
        self.source = source
        self.errors: list[str] = []
        # One parser per host/template key: the parsed value, or None after an error.
        self.field_parsers: dict[str, Callable[[Any, str], Any]] = {
            "vip": self.parse_vip, "cmd": self.parse_cmd, "ports": self.parse_ports,
            "http": self.parse_listen, "socks": self.parse_listen,
            "loopback": self.parse_loopback, "stateDir": self.parse_state_dir,
            "aliases": self.parse_aliases, "writeEtcHosts": self.boolean,
            "bootstrap": self.boolean,
        }

    def err(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def fail(self) -> ManifestError:
        return ManifestError(self.errors, self.source)

    # -- entry ------------------------------------------------------------------------

    def parse(self, text: str) -> Manifest:
        try:
            self.errors.extend(_duplicate_keys(text))
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ManifestError([f"not valid YAML: {e}"], self.source) from None
        except RecursionError:
            raise ManifestError(["not valid YAML: nested too deeply"], self.source) from None
        if doc is None:
            raise ManifestError(["the manifest is empty: it needs a `hosts:` mapping"],
                                self.source)
        if not isinstance(doc, dict):
            raise ManifestError([f"manifest: expected a mapping with `hosts:`, got "
                                 f"{_kind(doc)}"], self.source)
        self.check_keys(doc, "manifest", _TOP_KEYS)

        template = self.section(doc.get("hostTemplate"), "hostTemplate", template=True)
        raw_hosts = doc.get("hosts")
        if raw_hosts is None or raw_hosts == {}:
            self.err("hosts", "the manifest has no hosts: add at least one under `hosts:`")
            raise self.fail()
        if not isinstance(raw_hosts, dict):
            self.err("hosts", f"expected a mapping of host names to hosts, got "
                              f"{_kind(raw_hosts)}")
            raise self.fail()

        hosts: dict[str, HostSpec] = {}
        for name, raw in raw_hosts.items():
            path = f"hosts.{name}"
            if not isinstance(name, str):
                self.err(path, f"a host name must be a string, not {_kind(name)}; quote it")
                continue
            self.check_name(name, path, "host name")
            host = self.host(name, raw, path, template)
            if host is not None:
                hosts[name] = host
        self.check_unique(hosts)
        routes = self.routes(doc.get("routes"), hosts, list(raw_hosts))
        if self.errors:
            raise self.fail()
        return Manifest(hosts=hosts, routes=routes, source=self.source)

    # -- generic checks -------------------------------------------------------------

    def check_keys(self, raw: dict[Any, Any], path: str, allowed: Sequence[str]) -> None:
        for key in raw:
            if key in allowed:
                continue
            hint = ""
            if isinstance(key, str):
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6) or [
                    a for a in allowed if a.lower() == key.lower()]
                if close:
                    hint = f" (did you mean {_show(close[0])}?)"
            self.err(path, f"unknown key {_show(key)}{hint}; known keys: {', '.join(allowed)}")

    def mapping(self, raw: Any, path: str, allowed: Sequence[str]) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.err(path, f"expected a mapping, got {_kind(raw)} {_show(raw)}")
            return None
        self.check_keys(raw, path, allowed)
        return {k: v for k, v in raw.items() if k in allowed and v is not None}

    def boolean(self, raw: Any, path: str) -> bool | None:
        if not isinstance(raw, bool):
            self.err(path, f"expected true or false, got {_kind(raw)} {_show(raw)}")
            return None
        return raw

    def check_name(self, name: str, path: str, what: str) -> None:
        if not _HOSTNAME_RE.fullmatch(name):
            self.err(path, f"{what} {_show(name)} is not a valid name (letters, digits, "
                           "'-', '_' and '.', not starting or ending with '-' or '.')")
        elif _is_ipv4(name):
            self.err(path, f"{what} {_show(name)} is an IP address, not a name")

    # -- sections -------------------------------------------------------------------

    def section(self, raw: Any, path: str, *, template: bool) -> dict[str, Any]:
        """Parse the keys a host and the template share (plus a host's own); returns the
        parsed value of every key that is present."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.err(path, f"expected a mapping, got {_kind(raw)} {_show(raw)}")
            return {}
        if template:
            for key in _HOST_ONLY_KEYS:
                if key in raw:
                    self.err(f"{path}.{key}", f"hostTemplate may not set {key}; "
                                              "set it on each host")
            self.check_keys({k: v for k, v in raw.items() if k not in _HOST_ONLY_KEYS},
                            path, _TEMPLATE_KEYS)
        else:
            self.check_keys(raw, path, _HOST_KEYS)
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None or key not in _HOST_KEYS or (template and key in _HOST_ONLY_KEYS):
                continue
            parsed = self.field_parsers[key](value, f"{path}.{key}")
            if parsed is not None:
                out[key] = parsed
        return out

    def host(self, name: str, raw: Any, path: str, template: dict[str, Any]
             ) -> HostSpec | None:
        if raw is None:
            raw = {}
        own = self.section(raw, path, template=False)
        if not isinstance(raw, dict):
            return None
        if "vip" not in raw or raw["vip"] is None:
            self.err(path, "missing vip (an IPv4 address such as \"127.0.42.101\")")
        if "vip" not in own:
            return None

        def pick(key: str, default: Any) -> Any:
            return own.get(key, template.get(key, default))

        http = pick("http", "") or None
        socks = pick("socks", "") or None
        loopback = pick("loopback", {})
        state_dir = pick("stateDir", {})
        spec = HostSpec(
            name=name,
            vip=own["vip"],
            cmd=own.get("cmd"),
            ports=[*template.get("ports", []), *own.get("ports", [])],
            aliases=own.get("aliases", []),
            http_listen=http,
            socks_listen=socks,
            loopback_disable=loopback.get("disable", False),
            state_dir_path=state_dir.get("pathOnAgent"),
            state_dir_disable=state_dir.get("disable", False),
            write_etc_hosts=pick("writeEtcHosts", False),
            bootstrap=pick("bootstrap", False),
        )
        self.check_host(spec, path, template_ports=len(template.get("ports", [])))
        return spec

    def check_host(self, spec: HostSpec, path: str, template_ports: int) -> None:
        used: dict[int, str] = {}
        for i, p in enumerate(spec.ports):
            where = (f"hostTemplate.ports[{i}]" if i < template_ports
                     else f"{path}.ports[{i - template_ports}]")
            if p.listen_port in used:
                self.err(where, f"listen port {p.listen_port} is already used by "
                                f"{used[p.listen_port]} on host {spec.name}")
            else:
                used[p.listen_port] = where
        if spec.http_listen and spec.http_listen == spec.socks_listen:
            self.err(f"{path}.socks.listen", f"{_show(spec.socks_listen)} is also the http "
                                             "listen address")

    def check_unique(self, hosts: dict[str, HostSpec]) -> None:
        names: dict[str, str] = {}  # folded name -> path that defined it
        vips: dict[str, str] = {}
        for spec in hosts.values():
            path = f"hosts.{spec.name}"
            entries = [(spec.name, path)] + [(a, f"{path}.aliases[{i}]")
                                            for i, a in enumerate(spec.aliases)]
            for name, where in entries:
                folded = name.lower()
                if folded in names:
                    self.err(where, f"{_show(name)} is already used by {names[folded]} "
                                    "(names and aliases must be unique, case-insensitively)")
                else:
                    names[folded] = where
            if spec.vip in vips:
                self.err(f"{path}.vip", f"{_show(spec.vip)} is already the VIP of "
                                        f"{vips[spec.vip]}")
            else:
                vips[spec.vip] = f"hosts.{spec.name}"

    # -- fields (each returns the parsed value, or None after recording an error) ----

    def parse_vip(self, raw: Any, path: str) -> str | None:
        if not isinstance(raw, str):
            self.err(path, f"expected an IPv4 address, got {_kind(raw)} {_show(raw)}")
            return None
        try:
            addr = ipaddress.IPv4Address(raw)
        except ValueError:
            self.err(path, f"{_show(raw)} is not an IPv4 address")
            return None
        if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address(
                "255.255.255.255"):
            self.err(path, f"{_show(raw)} cannot be a VIP (need a unicast address)")
            return None
        return str(addr)

    def parse_cmd(self, raw: Any, path: str) -> list[str] | None:
        if isinstance(raw, str):
            try:
                argv = shlex.split(raw)
            except ValueError as e:
                self.err(path, f"{_show(raw)} cannot be split like a shell would: {e}")
                return None
        elif isinstance(raw, list):
            argv = []
            for i, arg in enumerate(raw):
                if not isinstance(arg, str):
                    self.err(f"{path}[{i}]", f"expected a string, got {_kind(arg)} "
                                             f"{_show(arg)}; quote it")
                    return None
                argv.append(arg)
        else:
            self.err(path, f"expected a command string or a list of strings, got "
                           f"{_kind(raw)} {_show(raw)}")
            return None
        if not argv or not argv[0]:
            self.err(path, "the command is empty (leave cmd out for the local host)")
            return None
        return argv

    def parse_aliases(self, raw: Any, path: str) -> list[str] | None:
        if not isinstance(raw, list):
            self.err(path, f"expected a list of names, got {_kind(raw)} {_show(raw)}")
            return None
        aliases = []
        for i, alias in enumerate(raw):
            if not isinstance(alias, str):
                self.err(f"{path}[{i}]", f"expected a name, got {_kind(alias)} {_show(alias)}")
                continue
            self.check_name(alias, f"{path}[{i}]", "alias")
            aliases.append(alias)
        return aliases

    def parse_ports(self, raw: Any, path: str) -> list[PortSpec] | None:
        if not isinstance(raw, list):
            self.err(path, f"expected a list of \"{_PORT_FORMAT}\" strings, got "
                           f"{_kind(raw)} {_show(raw)}")
            return None
        ports = []
        for i, entry in enumerate(raw):
            port = self.parse_port(entry, f"{path}[{i}]")
            if port is not None:
                ports.append(port)
        return ports

    def parse_port(self, raw: Any, path: str) -> PortSpec | None:
        if not isinstance(raw, str):
            # YAML 1.1 reads an unquoted 22:22 as the number 1342.
            self.err(path, f"{_show(raw)} is {_kind(raw)}, not a \"{_PORT_FORMAT}\" "
                           "string; quote the entry")
            return None
        m = _PORT_RE.fullmatch(raw)
        if m is None:
            self.err(path, f"{_show(raw)} is not {_PORT_FORMAT}")
            return None
        ok = True
        for part, what in (("listen", "listen port"), ("port", "connect port")):
            if not 1 <= int(m[part]) <= 65535:
                self.err(path, f"{what} {int(m[part])} in {_show(raw)} is out of range "
                               "1-65535")
                ok = False
        host = m["host"]
        if re.fullmatch(r"[0-9.]+", host) and not _is_ipv4(host):
            self.err(path, f"{_show(host)} in {_show(raw)} is not a valid IPv4 address")
            ok = False
        elif not _HOSTNAME_RE.fullmatch(host):
            self.err(path, f"{_show(host)} in {_show(raw)} is not an IPv4 address or a "
                           "host name")
            ok = False
        proto = m["proto"]
        if proto is not None and proto != "tcp":
            self.err(path, f"protocol {_show(proto)} in {_show(raw)} is not supported "
                           "(only tcp)")
            ok = False
        if not ok:
            return None
        return PortSpec(int(m["listen"]), host, int(m["port"]), "tcp")

    def parse_listen(self, raw: Any, path: str) -> str | None:
        """``{listen: "IP:PORT"}`` → the address; "" when set without one."""
        sub = self.mapping(raw, path, ("listen",))
        if sub is None:
            return None
        if "listen" not in sub:
            return ""  # set, and empty: still overrides the template's
        listen = sub["listen"]
        where = f"{path}.listen"
        if not isinstance(listen, str):
            self.err(where, f"expected \"IP:PORT\", got {_kind(listen)} {_show(listen)}")
            return None
        if listen == "":
            return ""
        ip, sep, port = listen.rpartition(":")
        if not sep or not _is_ipv4(ip) or not port.isdigit() or not 1 <= int(port) <= 65535:
            self.err(where, f"{_show(listen)} is not IP:PORT (an IPv4 address and a port "
                            "1-65535, e.g. \"127.0.0.1:18080\")")
            return None
        return listen

    def parse_loopback(self, raw: Any, path: str) -> dict[str, Any] | None:
        sub = self.mapping(raw, path, ("disable",))
        if sub is None:
            return None
        out: dict[str, Any] = {}
        if "disable" in sub and (v := self.boolean(sub["disable"], f"{path}.disable")):
            out["disable"] = v
        return out

    def parse_state_dir(self, raw: Any, path: str) -> dict[str, Any] | None:
        sub = self.mapping(raw, path, ("pathOnAgent", "disable"))
        if sub is None:
            return None
        out: dict[str, Any] = {}
        if "pathOnAgent" in sub:
            p = sub["pathOnAgent"]
            if not isinstance(p, str):
                self.err(f"{path}.pathOnAgent", f"expected a path, got {_kind(p)} {_show(p)}")
            elif p:
                out["pathOnAgent"] = p
        if "disable" in sub and (v := self.boolean(sub["disable"], f"{path}.disable")):
            out["disable"] = v
        return out

    # -- routes ---------------------------------------------------------------------

    def routes(self, raw: Any, hosts: dict[str, HostSpec], names: Iterable[Any]
               ) -> list[RouteSpec]:
        """``names``: every host name written, including hosts already found invalid."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.err("routes", f"expected a list of {{via, to}}, got {_kind(raw)}")
            return []
        by_vip = {h.vip: h.name for h in hosts.values()}
        routes = []
        for i, item in enumerate(raw):
            path = f"routes[{i}]"
            sub = self.mapping(item, path, _ROUTE_KEYS)
            if sub is None:
                continue
            for key in _ROUTE_KEYS:
                if key not in sub:
                    self.err(path, f"missing {key}")
            via = None
            if "via" in sub:
                v = sub["via"]
                if isinstance(v, str) and v in names and v not in hosts:
                    pass  # the via host is invalid: its errors are reported already
                else:
                    via = self.route_via(v, f"{path}.via", hosts, by_vip)
            to = self.route_to(sub["to"], f"{path}.to") if "to" in sub else None
            if via is not None and to is not None:
                routes.append(RouteSpec(via=via[0], via_host=via[1], to_cidr=to[0],
                                        to_hostname_glob=to[1]))
        return routes

    def route_via(self, raw: Any, path: str, hosts: dict[str, HostSpec],
                  by_vip: dict[str, str]) -> tuple[str, str] | None:
        if not isinstance(raw, str):
            self.err(path, f"expected a host name or a VIP, got {_kind(raw)} {_show(raw)}")
            return None
        if raw in hosts:
            return hosts[raw].vip, raw
        if _is_ipv4(raw):
            ip = str(ipaddress.IPv4Address(raw))
            if ip in by_vip:
                return ip, by_vip[ip]
            self.err(path, f"{_show(raw)} is not the VIP of any host "
                           "(packets for it could not be delivered)")
            return None
        hint = [n for n in hosts if n.lower() == raw.lower()]
        self.err(path, f"{_show(raw)} is neither a host name nor an IPv4 address"
                       + (f" (did you mean {_show(hint[0])}?)" if hint else ""))
        return None

    def route_to(self, raw: Any, path: str) -> tuple[list[str], list[str]] | None:
        if not isinstance(raw, list) or not raw:
            self.err(path, "expected a non-empty list of CIDRs and hostname globs, e.g. "
                           f"[\"192.168.95.0/24\", \"*.example.com\"], got {_show(raw)}")
            return None
        cidrs: list[str] = []
        globs: list[str] = []
        for i, entry in enumerate(raw):
            where = f"{path}[{i}]"
            if not isinstance(entry, str):
                self.err(where, f"expected a string, got {_kind(entry)} {_show(entry)}")
            elif "/" in entry:
                try:
                    ipaddress.IPv4Network(entry, strict=False)
                    cidrs.append(entry)
                except ValueError:
                    self.err(where, f"{_show(entry)} is not an IPv4 CIDR")
            elif _is_ipv4(entry):
                self.err(where, f"{_show(entry)} is an address, not a CIDR: "
                                f"write \"{entry}/32\"")
            elif _GLOB_RE.fullmatch(entry):
                globs.append(entry)
            else:
                self.err(where, f"{_show(entry)} is neither an IPv4 CIDR nor a hostname glob")
        return cidrs, globs


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
