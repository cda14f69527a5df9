"""Manifest loading, validation, and the configure requests derived from it."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_messages import WIRE_REQUEST_BASTION, WIRE_REQUEST_LOCAL, WIRE_REQUEST_WEB

from norouter_trio.manifest import (
    HostSpec,
    ManifestError,
    PortSpec,
    RouteSpec,
    configure_args,
    example_text,
    load_manifest,
)
from norouter_trio.messages import OP_CONFIGURE, IPPortProto, Request, encode_message

# The manifest of wire-examples.md, verbatim.
WIRE_MANIFEST = """\
hostTemplate:
  loopback: {disable: true}
  stateDir: {disable: true}
  ports: ["10022:127.0.0.1:22"]
hosts:
  local:
    vip: "127.0.42.100"
    http: {listen: "127.0.0.1:18080"}
    socks: {listen: "127.0.0.1:18081"}
  web:
    cmd: "norouter"
    vip: "127.0.42.101"
    ports: ["8080:127.0.0.1:80", "5432:db.internal:5432/tcp"]
    aliases: ["nginx", "nginx.example.com"]
    writeEtcHosts: true
  bastion:
    cmd: ["norouter"]
    vip: "127.0.42.150"
routes:
  - via: bastion
    to: ["198.18.95.0/24", "*.cloud1.example.com"]
  - via: 127.0.42.101
    to: ["198.19.0.0/16"]
"""

EXAMPLE_FILE = Path(__file__).parent.parent / "norouter_trio" / "examples" / "example.yaml"


def y(text: str) -> str:
    return textwrap.dedent(text)


# --- the recorded manifest --------------------------------------------------------------------


def test_wire_manifest_gives_the_recorded_configure_requests() -> None:
    manifest = load_manifest(WIRE_MANIFEST)
    assert list(manifest.hosts) == ["local", "web", "bastion"]  # file order
    recorded = [WIRE_REQUEST_LOCAL, WIRE_REQUEST_WEB, WIRE_REQUEST_BASTION]
    for request_id, (name, wire) in enumerate(zip(manifest.hosts, recorded, strict=True), 1):
        request = Request(id=request_id, op=OP_CONFIGURE, args=configure_args(manifest, name))
        assert encode_message(request) == wire, name
        assert manifest.configure_args(name) == request.args


def test_wire_manifest_host_specs() -> None:
    m = load_manifest(WIRE_MANIFEST)
    local, web, bastion = m.hosts.values()
    assert local.is_local and local.argv is None and local.cmd is None
    assert web.argv == ["norouter", "agent", "--automated"]
    assert bastion.argv == ["norouter", "agent", "--automated"]
    assert web == HostSpec(
        name="web", vip="127.0.42.101", cmd=["norouter"],
        ports=[PortSpec(10022, "127.0.0.1", 22), PortSpec(8080, "127.0.0.1", 80),
               PortSpec(5432, "db.internal", 5432)],
        aliases=["nginx", "nginx.example.com"], loopback_disable=True, state_dir_disable=True,
        write_etc_hosts=True)
    assert local.http_listen == "127.0.0.1:18080" and local.socks_listen == "127.0.0.1:18081"
    assert m.routes == [
        RouteSpec(via="127.0.42.150", via_host="bastion", to_cidr=["198.18.95.0/24"],
                  to_hostname_glob=["*.cloud1.example.com"]),
        RouteSpec(via="127.0.42.101", via_host="web", to_cidr=["198.19.0.0/16"]),
    ]


def test_load_from_path_and_path_string(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(WIRE_MANIFEST)
    assert load_manifest(f).source == str(f)
    assert list(load_manifest(str(f)).hosts) == ["local", "web", "bastion"]
    assert load_manifest(WIRE_MANIFEST.encode()).hosts.keys() == {"local", "web", "bastion"}


def test_missing_file_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        load_manifest(str(tmp_path / "nope.yaml"))
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        load_manifest(tmp_path / "nope.yaml")


def test_error_message_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("hosts:\n  web:\n    vip: 1.2.3\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(f)
    assert str(info.value) == f'{f}: hosts.web.vip: "1.2.3" is not an IPv4 address'


# --- the example ------------------------------------------------------------------------------


def test_example_is_shipped_and_parses() -> None:
    text = example_text()
    assert text == EXAMPLE_FILE.read_text()
    assert text.lstrip().startswith("#")
    m = load_manifest(text)
    assert len(m.hosts) >= 3
    assert any(h.is_local for h in m.hosts.values())
    assert m.routes and m.routes[0].to_cidr and m.routes[0].to_hostname_glob
    for name in m.hosts:  # every host yields an encodable configure request
        encode_message(Request(1, OP_CONFIGURE, configure_args(m, name)))


def test_example_is_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert "examples/*" in pyproject["tool"]["setuptools"]["package-data"]["norouter_trio"]


# --- merging and derivation -------------------------------------------------------------------


def test_host_values_replace_template_values_whole() -> None:
    m = load_manifest(y("""\
        hostTemplate:
          http: {listen: "127.0.0.1:8000"}
          loopback: {disable: true}
          stateDir: {pathOnAgent: /tmp/a, disable: true}
          writeEtcHosts: true
          bootstrap: true
        hosts:
          a: {vip: 10.0.0.1}
          b:
            vip: 10.0.0.2
            http: {}
            loopback: {disable: false}
            stateDir: {pathOnAgent: /tmp/b}
            writeEtcHosts: false
            bootstrap: false
        """))
    a, b = m.hosts["a"], m.hosts["b"]
    assert a.http_listen == "127.0.0.1:8000" and a.loopback_disable and a.write_etc_hosts
    assert a.state_dir_path == "/tmp/a" and a.state_dir_disable and a.bootstrap
    assert b.http_listen is None and not b.loopback_disable and not b.write_etc_hosts
    assert b.state_dir_path == "/tmp/b" and not b.state_dir_disable and not b.bootstrap


def test_bootstrap_is_carried_through() -> None:
    m = load_manifest("hosts:\n  a: {vip: 10.0.0.1, cmd: ssh a norouter, bootstrap: true}\n"
                      "  b: {vip: 10.0.0.2}\n")
    assert m.hosts["a"].bootstrap is True and m.hosts["b"].bootstrap is False


def test_cmd_is_split_like_a_shell() -> None:
    m = load_manifest(y("""\
        hosts:
          a:
            vip: 10.0.0.1
            cmd: ssh -o 'ProxyCommand=ssh -W %h:%p jump' "user@host name" -- ~/bin/norouter\\ x
          b:
            vip: 10.0.0.2
            cmd: ["docker", "exec", "-i", "c 1", "norouter"]
        """))
    assert m.hosts["a"].cmd == ["ssh", "-o", "ProxyCommand=ssh -W %h:%p jump",
                                "user@host name", "--", "~/bin/norouter x"]
    assert m.hosts["b"].argv == ["docker", "exec", "-i", "c 1", "norouter", "agent",
                                 "--automated"]


def test_derived_fields() -> None:
    m = load_manifest(y("""\
        hostTemplate: {ports: ["1:127.0.0.1:1"]}
        hosts:
          a: {vip: 10.0.0.1, aliases: [x, y.example], ports: ["2:h:2"]}
          b: {vip: 10.0.0.2}
        """))
    args = configure_args(m, "b")
    assert [(f.listen_port, f.connect_ip) for f in args.forwards] == [(1, "127.0.0.1")]
    assert args.others == [IPPortProto("10.0.0.1", 1), IPPortProto("10.0.0.1", 2)]
    assert args.hostname_map == {"a": "10.0.0.1", "x": "10.0.0.1", "y.example": "10.0.0.1",
                                 "b": "10.0.0.2"}
    assert args.name_servers == [IPPortProto("10.0.0.1", 10053), IPPortProto("10.0.0.2", 10053)]
    assert args.routes == [] and not args.loopback_disable
    with pytest.raises(KeyError):
        configure_args(m, "c")


def test_route_via_vip_and_entry_kinds() -> None:
    m = load_manifest(y("""\
        hosts:
          a: {vip: 10.0.0.1}
        routes:
          - via: 10.0.0.1
            to: ["192.168.1.5/24", "*.x.example", "db-[0-9].internal", "svc?"]
        """))
    assert m.routes == [RouteSpec(via="10.0.0.1", via_host="a", to_cidr=["192.168.1.5/24"],
                                  to_hostname_glob=["*.x.example", "db-[0-9].internal", "svc?"])]


def test_null_fields_count_as_absent() -> None:
    m = load_manifest("hosts:\n  a:\n    vip: 10.0.0.1\n    cmd:\n    ports:\n    http:\n"
                      "routes:\n")
    assert m.hosts["a"].is_local and m.hosts["a"].ports == [] and m.routes == []


# --- one test per invalid input ---------------------------------------------------------------

ONE_HOST = "hosts:\n  web:\n    vip: 127.0.42.101\n"

INVALID: list[tuple[str, str, str]] = [
    # (id, manifest, expected error text: names the host/field)
    ("empty", "", "the manifest is empty"),
    ("comments only", "# nothing\n", "the manifest is empty"),
    ("not a mapping", "- a\n- b\n", "manifest: expected a mapping"),
    ("no hosts key", "routes: []\n", "hosts: the manifest has no hosts"),
    ("empty hosts", "hosts: {}\n", "hosts: the manifest has no hosts"),
    ("hosts a list", "hosts: [a, b]\n", "hosts: expected a mapping of host names"),
    ("bad yaml", "hosts: {a: [}\n", "not valid YAML"),
    ("two documents", ONE_HOST + "---\n" + ONE_HOST, "not valid YAML"),
    ("unknown top key", ONE_HOST + "rotues: []\n",
     'manifest: unknown key "rotues" (did you mean "routes"?)'),
    ("unknown host key", ONE_HOST + "    prots: []\n",
     'hosts.web: unknown key "prots" (did you mean "ports"?)'),
    ("wrong case key", ONE_HOST + "    writeetchosts: true\n",
     'hosts.web: unknown key "writeetchosts" (did you mean "writeEtcHosts"?)'),
    ("unknown template key", "hostTemplate: {colour: red}\n" + ONE_HOST,
     'hostTemplate: unknown key "colour"'),
    ("template vip", "hostTemplate: {vip: 10.0.0.1}\n" + ONE_HOST,
     "hostTemplate.vip: hostTemplate may not set vip"),
    ("template cmd", "hostTemplate: {cmd: ssh}\n" + ONE_HOST,
     "hostTemplate.cmd: hostTemplate may not set cmd"),
    ("template aliases", "hostTemplate: {aliases: [x]}\n" + ONE_HOST,
     "hostTemplate.aliases: hostTemplate may not set aliases"),
    ("template not a mapping", "hostTemplate: [1]\n" + ONE_HOST,
     "hostTemplate: expected a mapping"),
    ("host not a mapping", "hosts:\n  web: 10.0.0.1\n", "hosts.web: expected a mapping"),
    ("host name not a string", "hosts:\n  123: {vip: 10.0.0.1}\n",
     "hosts.123: a host name must be a string"),
    ("host name invalid", "hosts:\n  'we b': {vip: 10.0.0.1}\n",
     'hosts.we b: host name "we b" is not a valid name'),
    ("host name is an ip", "hosts:\n  '10.0.0.9': {vip: 10.0.0.1}\n",
     'hosts.10.0.0.9: host name "10.0.0.9" is an IP address'),
    ("missing vip", "hosts:\n  web: {cmd: ssh web norouter}\n", "hosts.web: missing vip"),
    ("empty host", "hosts:\n  web:\n", "hosts.web: missing vip"),
    ("vip not ipv4", "hosts:\n  web: {vip: 'fd00::1'}\n",
     'hosts.web.vip: "fd00::1" is not an IPv4 address'),
    ("vip number", "hosts:\n  web: {vip: 42}\n", "hosts.web.vip: expected an IPv4 address"),
    ("vip unspecified", "hosts:\n  web: {vip: 0.0.0.0}\n",
     'hosts.web.vip: "0.0.0.0" cannot be a VIP'),
    ("vip duplicate", "hosts:\n  web: {vip: 10.0.0.1}\n  db: {vip: 10.0.0.1}\n",
     'hosts.db.vip: "10.0.0.1" is already the VIP of hosts.web'),
    ("alias equals other host", "hosts:\n  web: {vip: 10.0.0.1}\n"
     "  db: {vip: 10.0.0.2, aliases: [Web]}\n",
     'hosts.db.aliases[0]: "Web" is already used by hosts.web'),
    ("alias twice across hosts", "hosts:\n  web: {vip: 10.0.0.1, aliases: [x]}\n"
     "  db: {vip: 10.0.0.2, aliases: [x]}\n",
     'hosts.db.aliases[0]: "x" is already used by hosts.web.aliases[0]'),
    ("alias equals own name", "hosts:\n  web: {vip: 10.0.0.1, aliases: [web]}\n",
     'hosts.web.aliases[0]: "web" is already used by hosts.web'),
    ("aliases not a list", "hosts:\n  web: {vip: 10.0.0.1, aliases: nginx}\n",
     "hosts.web.aliases: expected a list of names"),
    ("alias invalid", "hosts:\n  web: {vip: 10.0.0.1, aliases: ['-x']}\n",
     'hosts.web.aliases[0]: alias "-x" is not a valid name'),
    ("alias not a string", "hosts:\n  web: {vip: 10.0.0.1, aliases: [[a]]}\n",
     "hosts.web.aliases[0]: expected a name"),
    ("cmd unbalanced quote", "hosts:\n  web: {vip: 10.0.0.1, cmd: \"ssh 'web\"}\n",
     "hosts.web.cmd: \"ssh 'web\" cannot be split like a shell would"),
    ("cmd empty", "hosts:\n  web: {vip: 10.0.0.1, cmd: ''}\n",
     "hosts.web.cmd: the command is empty"),
    ("cmd empty list", "hosts:\n  web: {vip: 10.0.0.1, cmd: []}\n",
     "hosts.web.cmd: the command is empty"),
    ("cmd list with number", "hosts:\n  web: {vip: 10.0.0.1, cmd: [ssh, -p, 2222]}\n",
     "hosts.web.cmd[2]: expected a string, got a number 2222; quote it"),
    ("cmd mapping", "hosts:\n  web: {vip: 10.0.0.1, cmd: {a: 1}}\n",
     "hosts.web.cmd: expected a command string or a list of strings"),
    ("ports not a list", "hosts:\n  web: {vip: 10.0.0.1, ports: '80:x:80'}\n",
     "hosts.web.ports: expected a list"),
    ("port two parts", "hosts:\n  web: {vip: 10.0.0.1, ports: ['8080:127.0.0.1:80', '8080:80']}\n",
     'hosts.web.ports[1]: "8080:80" is not LISTEN_PORT:CONNECT_HOST:CONNECT_PORT[/tcp]'),
    ("port sexagesimal", "hosts:\n  web:\n    vip: 10.0.0.1\n    ports: [22:22]\n",
     "hosts.web.ports[0]: 1342 is a number, not a"),
    ("port listen zero", "hosts:\n  web: {vip: 10.0.0.1, ports: ['0:h:80']}\n",
     'hosts.web.ports[0]: listen port 0 in "0:h:80" is out of range 1-65535'),
    ("port connect too big", "hosts:\n  web: {vip: 10.0.0.1, ports: ['80:h:65536']}\n",
     'hosts.web.ports[0]: connect port 65536 in "80:h:65536" is out of range 1-65535'),
    ("port udp", "hosts:\n  web: {vip: 10.0.0.1, ports: ['53:h:53/udp']}\n",
     'hosts.web.ports[0]: protocol "udp" in "53:h:53/udp" is not supported (only tcp)'),
    ("port bad ip", "hosts:\n  web: {vip: 10.0.0.1, ports: ['80:10.0.0.300:80']}\n",
     'hosts.web.ports[0]: "10.0.0.300" in "80:10.0.0.300:80" is not a valid IPv4 address'),
    ("port bad host", "hosts:\n  web: {vip: 10.0.0.1, ports: ['80:a_b$:80']}\n",
     'hosts.web.ports[0]: "a_b$" in "80:a_b$:80" is not an IPv4 address or a host name'),
    ("port listen twice", "hostTemplate: {ports: ['22:h:22']}\n"
     "hosts:\n  web: {vip: 10.0.0.1, ports: ['22:h:2222']}\n",
     "hosts.web.ports[0]: listen port 22 is already used by hostTemplate.ports[0] on host web"),
    ("template port bad", "hostTemplate: {ports: ['x']}\n" + ONE_HOST,
     'hostTemplate.ports[0]: "x" is not LISTEN_PORT'),
    ("http not a mapping", "hosts:\n  web: {vip: 10.0.0.1, http: '127.0.0.1:80'}\n",
     "hosts.web.http: expected a mapping"),
    ("http unknown key", "hosts:\n  web: {vip: 10.0.0.1, http: {lisen: '127.0.0.1:80'}}\n",
     'hosts.web.http: unknown key "lisen" (did you mean "listen"?)'),
    ("http no port", "hosts:\n  web: {vip: 10.0.0.1, http: {listen: 127.0.0.1}}\n",
     'hosts.web.http.listen: "127.0.0.1" is not IP:PORT'),
    ("http hostname", "hosts:\n  web: {vip: 10.0.0.1, http: {listen: 'localhost:80'}}\n",
     'hosts.web.http.listen: "localhost:80" is not IP:PORT'),
    ("socks port range", "hosts:\n  web: {vip: 10.0.0.1, socks: {listen: '127.0.0.1:0'}}\n",
     'hosts.web.socks.listen: "127.0.0.1:0" is not IP:PORT'),
    ("socks number", "hosts:\n  web: {vip: 10.0.0.1, socks: {listen: 1080}}\n",
     'hosts.web.socks.listen: expected "IP:PORT"'),
    ("http equals socks", "hosts:\n  web: {vip: 10.0.0.1, http: {listen: '127.0.0.1:1'},"
     " socks: {listen: '127.0.0.1:1'}}\n",
     'hosts.web.socks.listen: "127.0.0.1:1" is also the http listen address'),
    ("loopback disable not bool", "hosts:\n  web: {vip: 10.0.0.1, loopback: {disable: maybe}}\n",
     'hosts.web.loopback.disable: expected true or false, got a string "maybe"'),
    ("loopback unknown key", "hosts:\n  web: {vip: 10.0.0.1, loopback: {disabled: true}}\n",
     'hosts.web.loopback: unknown key "disabled" (did you mean "disable"?)'),
    ("stateDir path key", "hosts:\n  web: {vip: 10.0.0.1, stateDir: {path: /x}}\n",
     'hosts.web.stateDir: unknown key "path"'),
    ("stateDir path number", "hosts:\n  web: {vip: 10.0.0.1, stateDir: {pathOnAgent: 7}}\n",
     "hosts.web.stateDir.pathOnAgent: expected a path"),
    ("stateDir disable not bool", "hostTemplate: {stateDir: {disable: 1}}\n" + ONE_HOST,
     "hostTemplate.stateDir.disable: expected true or false"),
    ("writeEtcHosts not bool", "hosts:\n  web: {vip: 10.0.0.1, writeEtcHosts: 'sure'}\n",
     "hosts.web.writeEtcHosts: expected true or false"),
    ("bootstrap not bool", "hosts:\n  web: {vip: 10.0.0.1, bootstrap: 1}\n",
     "hosts.web.bootstrap: expected true or false"),
    ("duplicate host", "hosts:\n  web: {vip: 10.0.0.1}\n  web: {vip: 10.0.0.2}\n",
     'hosts: duplicate key "web" (lines 2 and 3)'),
    ("duplicate field", "hosts:\n  web:\n    vip: 10.0.0.1\n    vip: 10.0.0.2\n",
     'hosts.web: duplicate key "vip" (lines 3 and 4)'),
    ("routes not a list", ONE_HOST + "routes: {via: web}\n", "routes: expected a list"),
    ("route not a mapping", ONE_HOST + "routes: [web]\n", "routes[0]: expected a mapping"),
    ("route missing via", ONE_HOST + "routes: [{to: ['10.0.0.0/8']}]\n",
     "routes[0]: missing via"),
    ("route missing to", ONE_HOST + "routes: [{via: web}]\n", "routes[0]: missing to"),
    ("route unknown key", ONE_HOST + "routes: [{via: web, to: ['10.0.0.0/8'], too: []}]\n",
     'routes[0]: unknown key "too"'),
    ("route via unknown name", ONE_HOST + "routes: [{via: Web, to: ['10.0.0.0/8']}]\n",
     'routes[0].via: "Web" is neither a host name nor an IPv4 address (did you mean "web"?)'),
    ("route via foreign ip", ONE_HOST + "routes: [{via: 10.9.9.9, to: ['10.0.0.0/8']}]\n",
     'routes[0].via: "10.9.9.9" is not the VIP of any host'),
    ("route via number", ONE_HOST + "routes: [{via: 7, to: ['10.0.0.0/8']}]\n",
     "routes[0].via: expected a host name or a VIP"),
    ("route to empty", ONE_HOST + "routes: [{via: web, to: []}]\n",
     "routes[0].to: expected a non-empty list"),
    ("route to string", ONE_HOST + "routes: [{via: web, to: '10.0.0.0/8'}]\n",
     "routes[0].to: expected a non-empty list"),
    ("route to bare ip", ONE_HOST + "routes: [{via: web, to: ['198.18.0.1']}]\n",
     'routes[0].to[0]: "198.18.0.1" is an address, not a CIDR: write "198.18.0.1/32"'),
    ("route to bad cidr", ONE_HOST + "routes: [{via: web, to: ['10.0.0.0/33']}]\n",
     'routes[0].to[0]: "10.0.0.0/33" is not an IPv4 CIDR'),
    ("route to ipv6", ONE_HOST + "routes: [{via: web, to: ['fd00::/8']}]\n",
     'routes[0].to[0]: "fd00::/8" is not an IPv4 CIDR'),
    ("route to bad glob", ONE_HOST + "routes: [{via: web, to: ['a b.example']}]\n",
     'routes[0].to[0]: "a b.example" is neither an IPv4 CIDR nor a hostname glob'),
    ("route to number", ONE_HOST + "routes: [{via: web, to: [10]}]\n",
     "routes[0].to[0]: expected a string"),
]


@pytest.mark.parametrize(("manifest", "expected"), [(m, e) for _, m, e in INVALID],
                         ids=[i for i, _, _ in INVALID])
def test_invalid_manifest(manifest: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    assert expected in str(info.value)
    assert any(expected in e for e in info.value.errors)


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(y("""\
            hostTemplate: {vip: 10.0.0.9}
            hosts:
              web: {vip: 10.0.0.1, ports: ["80"], colour: blue}
              db: {vip: 10.0.0.1}
            routes:
              - {via: nowhere, to: ["1.2.3.4"]}
            """))
    errors = info.value.errors
    assert len(errors) == 6, errors
    text = str(info.value)
    assert text.startswith("6 errors in the manifest:\n")
    for fragment in ("hostTemplate.vip", "hosts.web.ports[0]", 'hosts.web: unknown key "colour"',
                     "hosts.db.vip", "routes[0].via", "routes[0].to[0]"):
        assert fragment in text


def test_manifest_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="hosts: the manifest has no hosts"):
        load_manifest("hosts:\n")


def test_unsafe_yaml_tags_are_refused() -> None:
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest("hosts: !!python/object/apply:os.system ['true']\n")


def test_readme_manifest_example_is_valid() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    m = load_manifest(block)
    assert [h.is_local for h in m.hosts.values()] == [True, False, False]


_yaml_scalars = (st.none() | st.booleans() | st.integers(-70000, 70000) | st.floats()
                 | st.text(max_size=10)
                 | st.sampled_from(["10.0.0.1", "10.0.0.2", "80:h:80", "10.0.0.0/8", "*.x",
                                    "ssh a", "127.0.0.1:80", "web", "db"]))
_yaml_keys = st.sampled_from([
    "hostTemplate", "hosts", "routes", "vip", "cmd", "ports", "http", "socks", "loopback",
    "stateDir", "aliases", "writeEtcHosts", "bootstrap", "listen", "disable", "pathOnAgent",
    "via", "to", "web", "db"]) | st.text(max_size=5)
_yaml_docs = st.recursive(
    _yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_yaml_keys, inner, max_size=5),
    max_leaves=25)


def _load_or_manifest_error(text: str) -> None:
    try:
        m = load_manifest(text + "\n")  # a newline: always YAML text, never a path
    except ManifestError as e:
        assert e.errors and all(isinstance(x, str) and x for x in e.errors)
        return
    for name in m.hosts:
        encode_message(Request(1, OP_CONFIGURE, configure_args(m, name)))


@given(st.text(max_size=200) | _yaml_docs.map(yaml.safe_dump))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_input_gives_a_manifest_or_a_manifest_error(text: str) -> None:
    _load_or_manifest_error(text)


def test_route_via_an_invalid_host_reports_only_the_host() -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest("hosts:\n  a: {vip: x}\n  b: {vip: 10.0.0.1}\n"
                      "routes: [{via: a, to: ['10.0.0.0/8']}, {via: [1], to: ['*.x']}]\n")
    assert info.value.errors == ['hosts.a.vip: "x" is not an IPv4 address',
                                 "routes[1].via: expected a host name or a VIP, got a list [1]"]


_host_names = st.sampled_from(["web", "db", "a"])
_shaped_docs = st.fixed_dictionaries({
    "hosts": st.dictionaries(_host_names | _yaml_scalars,
                             st.dictionaries(_yaml_keys, _yaml_docs, max_size=6)
                             | _yaml_docs, max_size=3),
}, optional={
    "hostTemplate": st.dictionaries(_yaml_keys, _yaml_docs, max_size=4),
    "routes": st.lists(st.dictionaries(st.sampled_from(["via", "to", "x"]),
                                       _yaml_docs | st.lists(_yaml_scalars, max_size=3)),
                       max_size=3),
})


@given(_shaped_docs)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_manifest_shaped_input_gives_a_manifest_or_a_manifest_error(doc: Any) -> None:
    _load_or_manifest_error(yaml.safe_dump(doc))
