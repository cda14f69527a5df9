"""JSON control messages: the payload of type-2 frames.

Three kinds of message travel as ``{"type": ..., "body": ...}``:

* ``request`` (manager → agent): :class:`Request`, today only ``op: "configure"`` whose
  ``args`` decode to :class:`ConfigureArgs`;
* ``result`` (agent → manager, answers one request): :class:`Result`, whose ``data`` for
  ``configure`` decodes to :class:`ConfigureResultData`;
* ``event`` (agent → manager, unprompted): :class:`Event`, today only ``routeSuggestion``
  whose ``data`` decodes to :class:`RouteSuggestion`.

Compatibility with NoRouter v0.6 (the Go original), see ``behaviour.md`` §3 and
``wire-examples.md``:

* :func:`encode_message` reproduces the Go encoder byte for byte: fields in declaration
  order, compact separators, the same ``omitempty`` choices (``http``, ``socks`` and
  ``loopback`` always present, ``{}`` when empty; ``stateDir`` only when set; route lists
  ``null`` when empty; ``hostnameMap`` keys sorted), and Go's string escaping (``<``, ``>``,
  ``&``, U+2028 and U+2029 as ``\\u003c`` ...; control characters other than ``\\n``,
  ``\\r``, ``\\t`` as ``\\u00XX``, as Go did before 1.22; invalid text as ``\\ufffd``).
* :func:`decode_message` matches key names case-insensitively like Go's ``encoding/json``
  (``statedir``, ``StateDir``, ``LISTEN_PORT`` all work; when a key appears twice the last
  one wins), ignores unknown keys, treats ``null`` as an absent field, and accepts
  ``"response"`` as a synonym of ``"result"``. Values are checked (IPv4 addresses, port
  ranges, integer ids): anything wrong raises :class:`MessageError` and nothing else.

The ``error`` of a result is free-form JSON in the original (a ``json.RawMessage``, which
the original agent never fills in: it stays silent instead). We send
``{"message": "TEXT"}`` — an object, as how-it-works.md shows ``"error": {}`` — and accept
any JSON value when decoding; :attr:`Result.error_message` turns whatever came into text.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias

__all__ = [
    "ALL_FEATURES",
    "DNS_PORT",
    "EVENT_ROUTE_SUGGESTION",
    "FEATURE_DNS",
    "FEATURE_ETCHOSTS",
    "FEATURE_HOSTALIASES",
    "FEATURE_HOSTALIASES_NIPIO",
    "FEATURE_HTTP",
    "FEATURE_LOOPBACK",
    "FEATURE_LOOPBACK_DISABLE",
    "FEATURE_ROUTES",
    "FEATURE_SOCKS",
    "FEATURE_TCP",
    "OP_CONFIGURE",
    "TYPE_EVENT",
    "TYPE_REQUEST",
    "TYPE_RESPONSE",
    "TYPE_RESULT",
    "ConfigureArgs",
    "ConfigureResultData",
    "Event",
    "Forward",
    "IPPortProto",
    "JSONNumber",
    "Message",
    "MessageError",
    "Request",
    "Result",
    "Route",
    "RouteSuggestion",
    "decode_message",
    "encode_message",
]

# --- constants ---------------------------------------------------------------------------

TYPE_REQUEST = "request"
TYPE_RESULT = "result"
TYPE_RESPONSE = "response"  # how-it-works.md's name for "result"; accepted, never sent
TYPE_EVENT = "event"

OP_CONFIGURE = "configure"
EVENT_ROUTE_SUGGESTION = "routeSuggestion"

# Port of the built-in DNS server (TCP) on every VIP; `nameServers` entries use it.
DNS_PORT = 10053

# Feature strings an agent advertises in its configure result (behaviour.md §3).
FEATURE_LOOPBACK = "loopback"
FEATURE_TCP = "tcp"
FEATURE_HTTP = "http"
FEATURE_LOOPBACK_DISABLE = "loopback.disable"
FEATURE_SOCKS = "socks"
FEATURE_HOSTALIASES = "hostaliases"
FEATURE_HOSTALIASES_NIPIO = 'hostaliases."nip.io"'
FEATURE_ETCHOSTS = "etchosts"
FEATURE_ROUTES = "routes"
FEATURE_DNS = "dns"

# Every feature string this protocol defines, in the order the original lists them.
ALL_FEATURES: tuple[str, ...] = (
    FEATURE_LOOPBACK,
    FEATURE_TCP,
    FEATURE_HTTP,
    FEATURE_LOOPBACK_DISABLE,
    FEATURE_SOCKS,
    FEATURE_HOSTALIASES,
    FEATURE_HOSTALIASES_NIPIO,
    FEATURE_ETCHOSTS,
    FEATURE_ROUTES,
    FEATURE_DNS,
)


class MessageError(ValueError):
    """A JSON control message that cannot be decoded (bad JSON or wrong shape).

    When the failure is inside a request whose ``id`` and ``op`` were readable, they are
    kept in :attr:`request_id` and :attr:`op` so that the agent can still answer with an
    error result.
    """

    def __init__(self, message: str, *, request_id: int | None = None,
                 op: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.op = op


class JSONNumber:
    """A JSON number that is not a plain integer, kept as its exact text.

    Free-form values (a result's ``error``, the args of an unknown op, the data of an
    unknown event) are carried like Go's ``json.RawMessage``: re-encoding them gives the
    same number text back.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JSONNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"JSONNumber({self.text!r})"

    def __float__(self) -> float:
        return float(self.text)


# --- message types -----------------------------------------------------------------------


@dataclass
class Forward:
    """Listen on VIP:listen_port in the stack, join to connect_ip:connect_port via the OS.

    ``connect_ip`` may be a host name (resolved by the agent's OS).
    """

    listen_port: int
    connect_ip: str
    connect_port: int
    proto: str = "tcp"


@dataclass
class IPPortProto:
    ip: str
    port: int
    proto: str = "tcp"


@dataclass
class Route:
    """Send packets for ``to_cidr`` / names matching ``to_hostname_glob`` through ``via``."""

    via: str
    to_cidr: list[str] = field(default_factory=list)
    to_hostname_glob: list[str] = field(default_factory=list)


@dataclass
class ConfigureArgs:
    """The ``args`` of a ``configure`` request (behaviour.md §3)."""

    me: str
    forwards: list[Forward] = field(default_factory=list)
    others: list[IPPortProto] = field(default_factory=list)
    hostname_map: dict[str, str] = field(default_factory=dict)
    http_listen: str | None = None
    socks_listen: str | None = None
    loopback_disable: bool = False
    state_dir_path: str | None = None
    state_dir_disable: bool = False
    write_etc_hosts: bool = False
    routes: list[Route] = field(default_factory=list)
    name_servers: list[IPPortProto] = field(default_factory=list)


@dataclass
class ConfigureResultData:
    features: list[str] = field(default_factory=list)
    version: str = ""


@dataclass
class RouteSuggestion:
    """Event data: the addresses in ``ip`` are reached through the agent whose VIP is
    ``route``."""

    ip: list[str]
    route: str


JSONValue: TypeAlias = Any  # None | bool | int | JSONNumber | float | str | list | dict


@dataclass
class Request:
    id: int
    op: str
    # ConfigureArgs for op "configure"; for any other op the args object as decoded.
    args: ConfigureArgs | dict[str, JSONValue] = field(default_factory=dict)


@dataclass
class Result:
    request_id: int
    op: str
    data: ConfigureResultData | None = None
    # None on success. Free-form JSON otherwise; we send {"message": TEXT} (see failure()).
    error: JSONValue = None

    @classmethod
    def failure(cls, request_id: int, op: str, message: str) -> Result:
        """An error result as this implementation sends it."""
        return cls(request_id=request_id, op=op, error={"message": message})

    @property
    def error_message(self) -> str | None:
        """The error as text, whatever JSON shape the peer used; None on success."""
        err = self.error
        if err is None:
            return None
        if isinstance(err, str):
            return err
        if isinstance(err, dict):
            for key, value in err.items():
                if _fold(key) == "MESSAGE" and isinstance(value, str):
                    return value
        return _encode_value(err)


@dataclass
class Event:
    type: str
    # RouteSuggestion for type "routeSuggestion"; for any other type the data as decoded.
    data: RouteSuggestion | JSONValue = None

    @classmethod
    def route_suggestion(cls, ip: Iterable[str], route: str) -> Event:
        return cls(type=EVENT_ROUTE_SUGGESTION, data=RouteSuggestion(ip=list(ip), route=route))


Message: TypeAlias = Request | Result | Event


# --- encoding ----------------------------------------------------------------------------

# Go's encodeState.string with escapeHTML (what json.Marshal does): `"` and `\` escaped,
# \n \r \t short, other control characters and < > & U+2028 U+2029 as \u00XX (lower-case
# hex). Lone surrogates (Python's stand-in for invalid UTF-8) become \ufffd, as Go writes
# for invalid bytes.
_ESCAPES: dict[str, str] = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
for _c in [*map(chr, range(0x20)), "<", ">", "&", "\u2028", "\u2029"]:
    _ESCAPES.setdefault(_c, f"\\u{ord(_c):04x}")
_NEEDS_ESCAPE = re.compile('["\\\\<>&\x00-\x1f\u2028\u2029\ud800-\udfff]')


def _escape_char(m: re.Match[str]) -> str:
    return _ESCAPES.get(m.group(), "\\ufffd")


def _encode_string(s: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, s) + '"'


def _encode_into(value: JSONValue, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_encode_string(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, JSONNumber):
        out.append(value.text)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"cannot encode {value!r} as JSON")
        # Go prints integral floats without a fraction; other values in Python's shortest
        # form (Go's exponent thresholds differ slightly; nothing we send uses floats).
        out.append(str(int(value)) if value.is_integer() and abs(value) < 1e21 else repr(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
            if i:
                out.append(",")
            out.append(_encode_string(key))
            out.append(":")
            _encode_into(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode_into(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _encode_value(value: JSONValue) -> str:
    out: list[str] = []
    _encode_into(value, out)
    return "".join(out)


def _ipp_obj(x: IPPortProto) -> dict[str, JSONValue]:
    return {"ip": x.ip, "port": x.port, "proto": x.proto}


def _args_obj(a: ConfigureArgs) -> dict[str, JSONValue]:
    o: dict[str, JSONValue] = {"me": a.me}
    if a.forwards:
        o["forwards"] = [
            {"listen_port": f.listen_port, "connect_ip": f.connect_ip,
             "connect_port": f.connect_port, "proto": f.proto}
            for f in a.forwards
        ]
    if a.others:
        o["others"] = [_ipp_obj(x) for x in a.others]
    if a.hostname_map:
        o["hostnameMap"] = {k: a.hostname_map[k] for k in sorted(a.hostname_map)}
    o["http"] = {"listen": a.http_listen} if a.http_listen else {}
    o["socks"] = {"listen": a.socks_listen} if a.socks_listen else {}
    o["loopback"] = {"disable": True} if a.loopback_disable else {}
    if a.state_dir_path or a.state_dir_disable:
        state_dir: dict[str, JSONValue] = {}
        if a.state_dir_path:
            state_dir["path"] = a.state_dir_path
        if a.state_dir_disable:
            state_dir["disable"] = True
        o["stateDir"] = state_dir
    if a.write_etc_hosts:
        o["writeEtcHosts"] = True
    if a.routes:
        o["routes"] = [
            {"toCIDR": list(r.to_cidr) or None,
             "toHostnameGlob": list(r.to_hostname_glob) or None,
             "via": r.via}
            for r in a.routes
        ]
    if a.name_servers:
        o["nameServers"] = [_ipp_obj(x) for x in a.name_servers]
    return o


def _message_obj(msg: Message | RouteSuggestion) -> dict[str, JSONValue]:
    if isinstance(msg, RouteSuggestion):
        msg = Event(type=EVENT_ROUTE_SUGGESTION, data=msg)
    if isinstance(msg, Request):
        args = _args_obj(msg.args) if isinstance(msg.args, ConfigureArgs) else msg.args
        return {"type": TYPE_REQUEST,
                "body": {"id": msg.id, "op": msg.op, "args": args}}
    if isinstance(msg, Result):
        body: dict[str, JSONValue] = {"request_id": msg.request_id, "op": msg.op}
        if msg.error is not None:
            body["error"] = msg.error
        if msg.data is not None:
            data: dict[str, JSONValue] = {}
            if msg.data.features:
                data["features"] = list(msg.data.features)
            if msg.data.version:
                data["version"] = msg.data.version
            body["data"] = data
        return {"type": TYPE_RESULT, "body": body}
    if isinstance(msg, Event):
        ev: dict[str, JSONValue] = {"type": msg.type}
        if isinstance(msg.data, RouteSuggestion):
            ev["data"] = {"ip": list(msg.data.ip), "route": msg.data.route}
        elif msg.data is not None:
            ev["data"] = msg.data
        return {"type": TYPE_EVENT, "body": ev}
    raise TypeError(f"not a message: {type(msg).__name__}")


def encode_message(msg: Message | RouteSuggestion) -> bytes:
    """The JSON payload of a type-2 frame, byte for byte as NoRouter v0.6 writes it.

    A bare :class:`RouteSuggestion` is sent as a ``routeSuggestion`` event. Raises
    ``TypeError``/``ValueError`` for values JSON cannot carry (only possible in free-form
    fields such as ``Result.error``).
    """
    return _encode_value(_message_obj(msg)).encode("utf-8")


# --- decoding ----------------------------------------------------------------------------

# Go's encoding/json folds key names: ASCII letters by case, and the Kelvin sign and the
# long s fold to K and S. Every field name here is ASCII, so nothing else can match.
_FOLD_TABLE = {ord(c): ord(c.upper()) for c in "abcdefghijklmnopqrstuvwxyz"}
_FOLD_TABLE[0x212A] = ord("K")
_FOLD_TABLE[0x017F] = ord("S")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _fold(name: str) -> str:
    return name.translate(_FOLD_TABLE)


class _Obj(dict[str, Any]):
    """A decoded JSON object that also remembers its key/value pairs in order (duplicates
    and case variants included), so that fields can be matched the way Go does."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _reject_constant(name: str) -> NoReturn:
    raise MessageError(f"invalid JSON: {name} is not a JSON value")


def _show(value: Any) -> str:
    """A short rendering of a decoded value for error messages."""
    try:
        text = _encode_value(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, JSONNumber)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _fail(where: str, what: str, value: Any) -> NoReturn:
    raise MessageError(f"{where}: expected {what}, got {_kind(value)} {_show(value)}")


def _fields(obj: Any, where: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Match ``obj``'s keys to ``names`` like Go: case-insensitively, last key wins,
    unknown keys ignored. A null value counts as absent."""
    if not isinstance(obj, dict):
        _fail(where, "an object", obj)
    wanted = {_fold(n): n for n in names}
    pairs = obj.pairs if isinstance(obj, _Obj) else list(obj.items())
    found: dict[str, Any] = {}
    for key, value in pairs:
        name = wanted.get(_fold(key))
        if name is not None:
            found[name] = value
    return {k: v for k, v in found.items() if v is not None}


def _required(f: dict[str, Any], name: str, where: str) -> Any:
    if name not in f:
        raise MessageError(f"{where}: missing {name!r}")
    return f[name]


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        _fail(where, "a string", value)
    # Python keeps lone \udXXX escapes as surrogates; Go decodes them as U+FFFD.
    return _SURROGATES.sub("\ufffd", value)


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, "an integer", value)
    if not lo <= value <= hi:
        raise MessageError(f"{where}: {value} is out of range {lo}..{hi}")
    return value


def _port(value: Any, where: str) -> int:
    return _int(value, where, 0, 0xFFFF)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(where, "true or false", value)
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(where, "an array", value)
    return value


def _ipv4(value: Any, where: str) -> str:
    text = _str(value, where)
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise MessageError(f"{where}: {_show(text)} is not an IPv4 address") from None


def _cidr(value: Any, where: str) -> str:
    text = _str(value, where)
    try:
        ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise MessageError(f"{where}: {_show(text)} is not an IPv4 CIDR") from None
    return text


def _opt_str(f: dict[str, Any], name: str, where: str) -> str | None:
    """An optional string field; absent and "" both mean None (Go's omitempty)."""
    if name not in f:
        return None
    return _str(f[name], f"{where}.{name}") or None


def _opt_bool(f: dict[str, Any], name: str, where: str) -> bool:
    return _bool(f[name], f"{where}.{name}") if name in f else False


def _items(f: dict[str, Any], name: str, where: str) -> list[tuple[str, Any]]:
    """``(path, element)`` for each element of the optional array ``f[name]``."""
    if name not in f:
        return []
    return [(f"{where}.{name}[{i}]", v) for i, v in enumerate(_list(f[name], f"{where}.{name}"))]


def _decode_ipp(value: Any, where: str) -> IPPortProto:
    f = _fields(value, where, ("ip", "port", "proto"))
    return IPPortProto(
        ip=_ipv4(_required(f, "ip", where), f"{where}.ip"),
        port=_port(_required(f, "port", where), f"{where}.port"),
        proto=_str(f.get("proto", "tcp"), f"{where}.proto"),
    )


def _decode_forward(value: Any, where: str) -> Forward:
    f = _fields(value, where, ("listen_port", "connect_ip", "connect_port", "proto"))
    connect_ip = _str(_required(f, "connect_ip", where), f"{where}.connect_ip")
    if not connect_ip:
        raise MessageError(f"{where}.connect_ip: empty")
    return Forward(
        listen_port=_port(_required(f, "listen_port", where), f"{where}.listen_port"),
        connect_ip=connect_ip,
        connect_port=_port(_required(f, "connect_port", where), f"{where}.connect_port"),
        proto=_str(f.get("proto", "tcp"), f"{where}.proto"),
    )


def _decode_route(value: Any, where: str) -> Route:
    f = _fields(value, where, ("toCIDR", "toHostnameGlob", "via"))
    return Route(
        via=_ipv4(_required(f, "via", where), f"{where}.via"),
        to_cidr=[_cidr(v, p) for p, v in _items(f, "toCIDR", where)],
        to_hostname_glob=[_str(v, p) for p, v in _items(f, "toHostnameGlob", where)],
    )


def _decode_configure_args(value: Any, where: str) -> ConfigureArgs:
    f = _fields(value, where, (
        "me", "forwards", "others", "hostnameMap", "http", "socks", "loopback", "stateDir",
        "writeEtcHosts", "routes", "nameServers"))
    args = ConfigureArgs(me=_ipv4(_required(f, "me", where), f"{where}.me"))
    args.forwards = [_decode_forward(v, p) for p, v in _items(f, "forwards", where)]
    args.others = [_decode_ipp(v, p) for p, v in _items(f, "others", where)]
    if "hostnameMap" in f:
        hmap = f["hostnameMap"]
        if not isinstance(hmap, dict):
            _fail(f"{where}.hostnameMap", "an object", hmap)
        for name, ip in (hmap.pairs if isinstance(hmap, _Obj) else hmap.items()):
            path = f"{where}.hostnameMap[{_show(name)}]"
            if ip is None:  # Go: a null net.IP, i.e. no address; skip it
                continue
            args.hostname_map[_str(name, path)] = _ipv4(ip, path)
    for key in ("http", "socks"):
        if key in f:
            sub = _fields(f[key], f"{where}.{key}", ("listen",))
            setattr(args, f"{key}_listen", _opt_str(sub, "listen", f"{where}.{key}"))
    if "loopback" in f:
        sub = _fields(f["loopback"], f"{where}.loopback", ("disable",))
        args.loopback_disable = _opt_bool(sub, "disable", f"{where}.loopback")
    if "stateDir" in f:
        sub = _fields(f["stateDir"], f"{where}.stateDir", ("path", "disable"))
        args.state_dir_path = _opt_str(sub, "path", f"{where}.stateDir")
        args.state_dir_disable = _opt_bool(sub, "disable", f"{where}.stateDir")
    args.write_etc_hosts = _opt_bool(f, "writeEtcHosts", where)
    args.routes = [_decode_route(v, p) for p, v in _items(f, "routes", where)]
    args.name_servers = [_decode_ipp(v, p) for p, v in _items(f, "nameServers", where)]
    return args


def _decode_request(body: Any) -> Request:
    f = _fields(body, "body", ("id", "op", "args"))
    req_id = _int(_required(f, "id", "body"), "body.id", -(2**63), 2**63 - 1)
    op = _str(_required(f, "op", "body"), "body.op")
    try:
        if op == OP_CONFIGURE:
            return Request(id=req_id, op=op,
                           args=_decode_configure_args(_required(f, "args", "body"), "body.args"))
        args = f.get("args", {})
        if not isinstance(args, dict):
            _fail("body.args", "an object", args)
        return Request(id=req_id, op=op, args=dict(args))
    except MessageError as e:
        e.request_id, e.op = req_id, op
        raise


def _decode_result(body: Any) -> Result:
    f = _fields(body, "body", ("request_id", "op", "error", "data"))
    result = Result(
        request_id=_int(_required(f, "request_id", "body"), "body.request_id",
                        -(2**63), 2**63 - 1),
        op=_str(_required(f, "op", "body"), "body.op"),
        error=f.get("error"),
    )
    if result.op == OP_CONFIGURE and "data" in f:
        d = _fields(f["data"], "body.data", ("features", "version"))
        result.data = ConfigureResultData(
            features=[_str(v, p) for p, v in _items(d, "features", "body.data")],
            version=_str(d.get("version", ""), "body.data.version"),
        )
    return result


def _decode_event(body: Any) -> Event:
    f = _fields(body, "body", ("type", "data"))
    event = Event(type=_str(_required(f, "type", "body"), "body.type"), data=f.get("data"))
    if event.type == EVENT_ROUTE_SUGGESTION:
        d = _fields(_required(f, "data", "body"), "body.data", ("ip", "route"))
        event.data = RouteSuggestion(
            ip=[_ipv4(v, p) for p, v in _items(d, "ip", "body.data")],
            route=_ipv4(_required(d, "route", "body.data"), "body.data.route"),
        )
    return event


def decode_message(payload: bytes | bytearray | memoryview) -> Message:
    """Decode the JSON payload of a type-2 frame.

    Raises :class:`MessageError` (a ``ValueError``) for any input that is not a well-formed
    request, result or event — and no other exception, whatever the bytes.
    """
    try:
        # Go accepts invalid UTF-8 inside strings (as U+FFFD); elsewhere it is a syntax
        # error either way.
        text = bytes(payload).decode("utf-8", errors="replace")
        try:
            value = json.loads(text, object_pairs_hook=_Obj, parse_float=JSONNumber,
                               parse_constant=_reject_constant)
        except MessageError:
            raise
        except ValueError as e:  # JSONDecodeError, and over-long integer literals
            raise MessageError(f"invalid JSON: {e}") from None
        f = _fields(value, "message", ("type", "body"))
        mtype = _str(f.get("type", ""), "message.type")
        body = f.get("body")
        if mtype == TYPE_REQUEST:
            return _decode_request(body)
        if mtype in (TYPE_RESULT, TYPE_RESPONSE):
            return _decode_result(body)
        if mtype == TYPE_EVENT:
            return _decode_event(body)
        raise MessageError(f"message.type: unknown message type {_show(mtype)}")
    except RecursionError:
        raise MessageError("invalid JSON: nested too deeply") from None
