"""JSON control messages: byte-for-byte compatibility with NoRouter v0.6.5, tolerant
decoding, and a decoder that fails only with MessageError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from norouter_trio.messages import (
    ALL_FEATURES,
    FEATURE_HOSTALIASES_NIPIO,
    OP_CONFIGURE,
    ConfigureArgs,
    ConfigureResultData,
    Event,
    Forward,
    IPPortProto,
    JSONNumber,
    MessageError,
    Request,
    Result,
    Route,
    RouteSuggestion,
    decode_message,
    encode_message,
)

# --- the recorded frames of wire-examples.md, verbatim -----------------------------------

WIRE_REQUEST_LOCAL = (
    b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"127.0.42.100","forwards":[{"listen_port":10022,"connect_ip":"127.0.0.1","connect_port":22,"proto":"tcp"}],"others":[{"ip":"127.0.42.101","port":10022,"proto":"tcp"},{"ip":"127.0.42.101","port":8080,"proto":"tcp"},{"ip":"127.0.42.101","port":5432,"proto":"tcp"},{"ip":"127.0.42.150","port":10022,"proto":"tcp"}],"hostnameMap":{"bastion":"127.0.42.150","local":"127.0.42.100","nginx":"127.0.42.101","nginx.example.com":"127.0.42.101","web":"127.0.42.101"},"http":{"listen":"127.0.0.1:18080"},"socks":{"listen":"127.0.0.1:18081"},"loopback":{"disable":true},"stateDir":{"disable":true},"routes":[{"toCIDR":["198.18.95.0/24"],"toHostnameGlob":["*.cloud1.example.com"],"via":"127.0.42.150"},{"toCIDR":["198.19.0.0/16"],"toHostnameGlob":null,"via":"127.0.42.101"}],"nameServers":[{"ip":"127.0.42.100","port":10053,"proto":"tcp"},{"ip":"127.0.42.101","port":10053,"proto":"tcp"},{"ip":"127.0.42.150","port":10053,"proto":"tcp"}]}}}'
)
WIRE_REQUEST_WEB = (
    b'{"type":"request","body":{"id":2,"op":"configure","args":{"me":"127.0.42.101","forwards":[{"listen_port":10022,"connect_ip":"127.0.0.1","connect_port":22,"proto":"tcp"},{"listen_port":8080,"connect_ip":"127.0.0.1","connect_port":80,"proto":"tcp"},{"listen_port":5432,"connect_ip":"db.internal","connect_port":5432,"proto":"tcp"}],"others":[{"ip":"127.0.42.100","port":10022,"proto":"tcp"},{"ip":"127.0.42.150","port":10022,"proto":"tcp"}],"hostnameMap":{"bastion":"127.0.42.150","local":"127.0.42.100","nginx":"127.0.42.101","nginx.example.com":"127.0.42.101","web":"127.0.42.101"},"http":{},"socks":{},"loopback":{"disable":true},"stateDir":{"disable":true},"writeEtcHosts":true,"routes":[{"toCIDR":["198.18.95.0/24"],"toHostnameGlob":["*.cloud1.example.com"],"via":"127.0.42.150"},{"toCIDR":["198.19.0.0/16"],"toHostnameGlob":null,"via":"127.0.42.101"}],"nameServers":[{"ip":"127.0.42.100","port":10053,"proto":"tcp"},{"ip":"127.0.42.101","port":10053,"proto":"tcp"},{"ip":"127.0.42.150","port":10053,"proto":"tcp"}]}}}'
)
WIRE_REQUEST_BASTION = (
    b'{"type":"request","body":{"id":3,"op":"configure","args":{"me":"127.0.42.150","forwards":[{"listen_port":10022,"connect_ip":"127.0.0.1","connect_port":22,"proto":"tcp"}],"others":[{"ip":"127.0.42.100","port":10022,"proto":"tcp"},{"ip":"127.0.42.101","port":10022,"proto":"tcp"},{"ip":"127.0.42.101","port":8080,"proto":"tcp"},{"ip":"127.0.42.101","port":5432,"proto":"tcp"}],"hostnameMap":{"bastion":"127.0.42.150","local":"127.0.42.100","nginx":"127.0.42.101","nginx.example.com":"127.0.42.101","web":"127.0.42.101"},"http":{},"socks":{},"loopback":{"disable":true},"stateDir":{"disable":true},"routes":[{"toCIDR":["198.18.95.0/24"],"toHostnameGlob":["*.cloud1.example.com"],"via":"127.0.42.150"},{"toCIDR":["198.19.0.0/16"],"toHostnameGlob":null,"via":"127.0.42.101"}],"nameServers":[{"ip":"127.0.42.100","port":10053,"proto":"tcp"},{"ip":"127.0.42.101","port":10053,"proto":"tcp"},{"ip":"127.0.42.150","port":10053,"proto":"tcp"}]}}}'
)
WIRE_RESULT = (
    b'{"type":"result","body":{"request_id":1,"op":"configure","data":{"features":["loopback","tcp","http","loopback.disable","socks","hostaliases","etchosts","routes","dns"],"version":"0.6.5+dev"}}}'
)
WIRE_ALL = [WIRE_REQUEST_LOCAL, WIRE_REQUEST_WEB, WIRE_REQUEST_BASTION, WIRE_RESULT]

ROUTES = [
    Route(via="127.0.42.150", to_cidr=["198.18.95.0/24"],
          to_hostname_glob=["*.cloud1.example.com"]),
    Route(via="127.0.42.101", to_cidr=["198.19.0.0/16"]),
]
HOSTNAME_MAP = {"web": "127.0.42.101", "nginx": "127.0.42.101", "local": "127.0.42.100",
                "nginx.example.com": "127.0.42.101", "bastion": "127.0.42.150"}
NAME_SERVERS = [IPPortProto("127.0.42.100", 10053), IPPortProto("127.0.42.101", 10053),
                IPPortProto("127.0.42.150", 10053)]


# --- byte-for-byte -------------------------------------------------------------------------


@pytest.mark.parametrize("wire", WIRE_ALL, ids=["local", "web", "bastion", "result"])
def test_recorded_frames_reencode_byte_for_byte(wire: bytes) -> None:
    assert encode_message(decode_message(wire)) == wire


def test_request_built_from_dataclasses_matches_recording() -> None:
    args = ConfigureArgs(
        me="127.0.42.100",
        forwards=[Forward(10022, "127.0.0.1", 22)],
        others=[IPPortProto("127.0.42.101", 10022), IPPortProto("127.0.42.101", 8080),
                IPPortProto("127.0.42.101", 5432), IPPortProto("127.0.42.150", 10022)],
        hostname_map=dict(HOSTNAME_MAP),  # insertion order is not sorted: encoder sorts
        http_listen="127.0.0.1:18080",
        socks_listen="127.0.0.1:18081",
        loopback_disable=True,
        state_dir_disable=True,
        routes=ROUTES,
        name_servers=NAME_SERVERS,
    )
    assert encode_message(Request(id=1, op=OP_CONFIGURE, args=args)) == WIRE_REQUEST_LOCAL


def test_web_request_decodes_to_expected_fields() -> None:
    req = decode_message(WIRE_REQUEST_WEB)
    assert isinstance(req, Request)
    assert req.id == 2 and req.op == "configure"
    args = req.args
    assert isinstance(args, ConfigureArgs)
    assert args.me == "127.0.42.101"
    assert args.forwards == [Forward(10022, "127.0.0.1", 22), Forward(8080, "127.0.0.1", 80),
                             Forward(5432, "db.internal", 5432)]
    assert args.others == [IPPortProto("127.0.42.100", 10022),
                           IPPortProto("127.0.42.150", 10022)]
    assert args.hostname_map == HOSTNAME_MAP
    assert args.http_listen is None and args.socks_listen is None
    assert args.loopback_disable and args.state_dir_disable and args.state_dir_path is None
    assert args.write_etc_hosts
    assert args.routes == ROUTES
    assert args.name_servers == NAME_SERVERS


def test_result_matches_recording_and_frame_size() -> None:
    features = ["loopback", "tcp", "http", "loopback.disable", "socks", "hostaliases",
                "etchosts", "routes", "dns"]
    result = Result(request_id=1, op=OP_CONFIGURE,
                    data=ConfigureResultData(features=features, version="0.6.5+dev"))
    payload = encode_message(result)
    assert payload == WIRE_RESULT
    assert 8 + len(payload) == 201  # header 42 00 00 c5 + 00 02 00 00
    assert b'"error"' not in payload
    assert decode_message(WIRE_RESULT) == result


def test_minimal_args_always_carry_http_socks_loopback() -> None:
    payload = encode_message(Request(7, OP_CONFIGURE, ConfigureArgs(me="127.0.42.101")))
    assert payload == (b'{"type":"request","body":{"id":7,"op":"configure","args":'
                       b'{"me":"127.0.42.101","http":{},"socks":{},"loopback":{}}}}')


def test_state_dir_and_routes_omitempty_rules() -> None:
    args = ConfigureArgs(me="10.0.0.1", state_dir_path="~/.norouter/agent",
                         routes=[Route(via="10.0.0.2", to_hostname_glob=["*.x"])])
    body = encode_message(Request(1, OP_CONFIGURE, args))
    assert b'"stateDir":{"path":"~/.norouter/agent"}' in body
    assert b'"routes":[{"toCIDR":null,"toHostnameGlob":["*.x"],"via":"10.0.0.2"}]' in body
    assert b"writeEtcHosts" not in body and b"forwards" not in body
    assert b"hostnameMap" not in body and b"nameServers" not in body
    both = ConfigureArgs(me="10.0.0.1", state_dir_path="/s", state_dir_disable=True)
    assert b'"stateDir":{"path":"/s","disable":true}' in encode_message(
        Request(1, OP_CONFIGURE, both))


def test_go_string_escaping() -> None:
    err = "a<b>&c \u2028\u2029 \x01\x08\x0c\x1f\x7f\n\r\t\"\\ é \ud800"
    payload = encode_message(Result.failure(1, OP_CONFIGURE, err))
    assert payload == (
        b'{"type":"result","body":{"request_id":1,"op":"configure","error":{"message":'
        b'"a\\u003cb\\u003e\\u0026c \\u2028\\u2029 \\u0001\\u0008\\u000c\\u001f\x7f'
        b'\\n\\r\\t\\"\\\\ \xc3\xa9 \\ufffd"}}}')
    back = decode_message(payload)
    assert isinstance(back, Result)
    assert back.error_message == err.replace("\ud800", "\ufffd")


def test_hostname_map_keys_sorted_by_bytes() -> None:
    args = ConfigureArgs(me="10.0.0.1", hostname_map={"b": "10.0.0.2", "B": "10.0.0.3",
                                                      "a": "10.0.0.4", "é": "10.0.0.5"})
    payload = encode_message(Request(1, OP_CONFIGURE, args))
    assert b'"hostnameMap":{"B":"10.0.0.3","a":"10.0.0.4","b":"10.0.0.2","\xc3\xa9":' in payload


# --- decoding tolerance ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["stateDir", "statedir", "StateDir", "STATEDIR", "sTaTeDiR"])
def test_keys_are_case_insensitive(key: str) -> None:
    payload = json.dumps({"Type": "request", "BODY": {"ID": 5, "Op": "configure", "aRgS": {
        "ME": "127.0.42.101", key: {"PATH": "/tmp/x", "Disable": True},
        "Forwards": [{"LISTEN_PORT": 80, "Connect_IP": "db", "connect_PORT": 5432}],
        "hostnamemap": {"Web": "127.0.42.101"}, "WRITEETCHOSTS": True,
        "routes": [{"tocidr": ["10.0.0.0/8"], "TOHOSTNAMEGLOB": ["*.a"], "VIA": "127.0.42.1"}],
    }}}).encode()
    req = decode_message(payload)
    assert isinstance(req, Request) and isinstance(req.args, ConfigureArgs)
    a = req.args
    assert req.id == 5 and a.me == "127.0.42.101"
    assert a.state_dir_path == "/tmp/x" and a.state_dir_disable
    assert a.forwards == [Forward(80, "db", 5432, "tcp")]
    assert a.hostname_map == {"Web": "127.0.42.101"}  # map keys are data, kept as sent
    assert a.write_etc_hosts
    assert a.routes == [Route(via="127.0.42.1", to_cidr=["10.0.0.0/8"], to_hostname_glob=["*.a"])]


def test_go_folding_of_kelvin_sign_and_long_s() -> None:
    # Go's encoding/json folds U+212A KELVIN SIGN to k and U+017F LONG S to s.
    payload = '{"type":"request","body":{"id":1,"op":"configure","args":{"me":"10.0.0.1",' \
              '"\u017fock\u017f":{"listen":"127.0.0.1:1080"},"loopbac\u212a":{"disable":true}}}}'
    req = decode_message(payload.encode())
    assert isinstance(req, Request) and isinstance(req.args, ConfigureArgs)
    assert req.args.socks_listen == "127.0.0.1:1080"
    assert req.args.loopback_disable


def test_last_duplicate_key_wins_across_case_variants() -> None:
    payload = b'{"type":"request","body":{"id":1,"op":"configure","args":' \
              b'{"me":"10.0.0.1","ME":"10.0.0.2","me":"10.0.0.3","Me":"10.0.0.4"}}}'
    req = decode_message(payload)
    assert isinstance(req, Request) and isinstance(req.args, ConfigureArgs)
    assert req.args.me == "10.0.0.4"


def test_response_is_a_synonym_of_result() -> None:
    payload = WIRE_RESULT.replace(b'"type":"result"', b'"type":"response"')
    result = decode_message(payload)
    assert isinstance(result, Result)
    assert result == decode_message(WIRE_RESULT)
    assert encode_message(result) == WIRE_RESULT  # we always send "result"


def test_unknown_keys_are_ignored() -> None:
    payload = (b'{"type":"request","extra":1,"body":{"id":1,"op":"configure","future":[1],'
               b'"args":{"me":"10.0.0.1","shinyNewThing":{"a":1},'
               b'"forwards":[{"listen_port":1,"connect_ip":"x","connect_port":2,"zzz":0}]}}}')
    req = decode_message(payload)
    assert isinstance(req, Request) and isinstance(req.args, ConfigureArgs)
    assert req.args.forwards == [Forward(1, "x", 2)]


def test_null_means_absent_and_empty_strings_mean_unset() -> None:
    payload = (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"10.0.0.1",'
               b'"forwards":null,"http":{"listen":""},"socks":null,"stateDir":{"path":""},'
               b'"routes":[{"toCIDR":null,"toHostnameGlob":null,"via":"10.0.0.2"}]}}}')
    req = decode_message(payload)
    assert isinstance(req, Request)
    assert req.args == ConfigureArgs(me="10.0.0.1", routes=[Route(via="10.0.0.2")])


def test_unknown_op_keeps_args_and_id() -> None:
    req = decode_message(b'{"type":"request","body":{"id":9,"op":"reboot","args":{"now":1.50}}}')
    assert req == Request(id=9, op="reboot", args={"now": JSONNumber("1.50")})
    assert encode_message(req) == b'{"type":"request","body":{"id":9,"op":"reboot",' \
                                  b'"args":{"now":1.50}}}'


def test_error_results() -> None:
    sent = Result.failure(3, OP_CONFIGURE, "already configured")
    payload = encode_message(sent)
    assert payload == (b'{"type":"result","body":{"request_id":3,"op":"configure",'
                       b'"error":{"message":"already configured"}}}')
    got = decode_message(payload)
    assert got == sent and isinstance(got, Result)
    assert got.error_message == "already configured" and got.data is None
    # Whatever shape a peer uses for `error`, it is kept and readable.
    as_string = decode_message(b'{"type":"result","body":{"request_id":3,"op":"configure",'
                               b'"error":"boom"}}')
    assert isinstance(as_string, Result) and as_string.error_message == "boom"
    as_other = decode_message(b'{"type":"result","body":{"request_id":3,"op":"configure",'
                              b'"error":{"code":7}}}')
    assert isinstance(as_other, Result) and as_other.error_message == '{"code":7}'
    ok = decode_message(WIRE_RESULT)
    assert isinstance(ok, Result) and ok.error_message is None


def test_route_suggestion_event() -> None:
    event = Event.route_suggestion(["198.18.95.3", "198.18.95.4"], "127.0.42.150")
    payload = encode_message(event)
    assert payload == (b'{"type":"event","body":{"type":"routeSuggestion","data":'
                       b'{"ip":["198.18.95.3","198.18.95.4"],"route":"127.0.42.150"}}}')
    assert decode_message(payload) == event
    assert encode_message(event.data) == payload  # a bare RouteSuggestion is sent as an event
    assert isinstance(event.data, RouteSuggestion)


def test_unknown_event_keeps_its_data() -> None:
    payload = b'{"type":"event","body":{"type":"somethingNew","data":{"x":[true,null]}}}'
    event = decode_message(payload)
    assert event == Event(type="somethingNew", data={"x": [True, None]})
    assert encode_message(event) == payload


def test_feature_strings() -> None:
    assert FEATURE_HOSTALIASES_NIPIO == 'hostaliases."nip.io"'
    assert set(ALL_FEATURES) == {"loopback", "tcp", "http", "loopback.disable", "socks",
                                 "hostaliases", 'hostaliases."nip.io"', "etchosts", "routes",
                                 "dns"}


# --- rejections -------------------------------------------------------------------------------

BAD = [
    (b"", "invalid JSON"),
    (b"{", "invalid JSON"),
    (b'{"type":"request"} x', "invalid JSON"),
    (b"NaN", "invalid JSON"),
    (b'{"type":"event","body":{"type":"x","data":Infinity}}', "invalid JSON"),
    (b"\xef\xbb\xbf{}", "invalid JSON"),
    (b"[1,2]", "message: expected an object"),
    (b"null", "message: expected an object"),
    (b'{"type":"hello","body":{}}', "unknown message type"),
    (b'{"body":{}}', "unknown message type"),
    (b'{"type":5}', "message.type: expected a string"),
    (b'{"type":"request"}', "body: expected an object"),
    (b'{"type":"request","body":{"op":"configure"}}', "missing 'id'"),
    (b'{"type":"request","body":{"id":"1","op":"configure"}}', "body.id: expected an integer"),
    (b'{"type":"request","body":{"id":true,"op":"configure"}}', "body.id: expected an integer"),
    (b'{"type":"request","body":{"id":1.0,"op":"configure"}}', "body.id: expected an integer"),
    (b'{"type":"request","body":{"id":1e2,"op":"configure"}}', "body.id: expected an integer"),
    (b'{"type":"request","body":{"id":99999999999999999999,"op":"x"}}', "out of range"),
    (b'{"type":"request","body":{"id":1}}', "missing 'op'"),
    (b'{"type":"request","body":{"id":1,"op":"configure"}}', "missing 'args'"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{}}}', "missing 'me'"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"::1"}}}',
     "body.args.me: \"::1\" is not an IPv4 address"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"127.0.42.01"}}}',
     "not an IPv4 address"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"1.2.3.4",'
     b'"forwards":{}}}}', "body.args.forwards: expected an array"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"1.2.3.4",'
     b'"forwards":[{"listen_port":70000,"connect_ip":"x","connect_port":1}]}}}',
     "body.args.forwards[0].listen_port: 70000 is out of range 0..65535"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"1.2.3.4",'
     b'"forwards":[{"listen_port":1,"connect_ip":"","connect_port":1}]}}}',
     "connect_ip: empty"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"1.2.3.4",'
     b'"others":[{"ip":"1.2.3.4","port":-1}]}}}', "body.args.others[0].port"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"1.2.3.4",'
     b'"hostnameMap":{"a":"b"}}}}', 'hostnameMap["a"]'),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"1.2.3.4",'
     b'"loopback":{"disable":"yes"}}}}', "body.args.loopback.disable: expected true or false"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"1.2.3.4",'
     b'"routes":[{"toCIDR":["10.0.0.0/33"],"via":"1.2.3.4"}]}}}',
     "body.args.routes[0].toCIDR[0]"),
    (b'{"type":"request","body":{"id":1,"op":"configure","args":{"me":"1.2.3.4",'
     b'"routes":[{"toCIDR":["10.0.0.0/8"]}]}}}', "body.args.routes[0]: missing 'via'"),
    (b'{"type":"request","body":{"id":1,"op":"other","args":[1]}}', "body.args"),
    (b'{"type":"result","body":{"request_id":1,"op":"configure","data":[]}}', "body.data"),
    (b'{"type":"result","body":{"request_id":1,"op":"configure","data":{"features":[1]}}}',
     "body.data.features[0]"),
    (b'{"type":"event","body":{"type":"routeSuggestion"}}', "missing 'data'"),
    (b'{"type":"event","body":{"type":"routeSuggestion","data":{"ip":["x"],"route":"1.2.3.4"}}}',
     "body.data.ip[0]"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    (b'{"type":"request","body":{"id":' + b"9" * 5000 + b',"op":"x"}}', "invalid JSON"),
]


@pytest.mark.parametrize(("payload", "fragment"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_messages_raise_message_error(payload: bytes, fragment: str) -> None:
    with pytest.raises(MessageError) as info:
        decode_message(payload)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_message_error_keeps_request_id_for_an_error_result() -> None:
    with pytest.raises(MessageError) as info:
        decode_message(b'{"type":"request","body":{"id":42,"op":"configure","args":{"me":"x"}}}')
    assert info.value.request_id == 42 and info.value.op == "configure"
    with pytest.raises(MessageError) as info:
        decode_message(b'{"type":"request","body":{"id":"42"}}')
    assert info.value.request_id is None


# --- property tests ---------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from([
    "type", "body", "id", "op", "args", "request_id", "error", "data", "me", "forwards",
    "others", "hostnameMap", "http", "socks", "loopback", "stateDir", "writeEtcHosts", "routes",
    "nameServers", "listen", "disable", "path", "listen_port", "connect_ip", "connect_port",
    "proto", "ip", "port", "toCIDR", "toHostnameGlob", "via", "features", "version", "route",
    "request", "result", "response", "event", "configure", "routeSuggestion",
]) | st.text(max_size=6)
plausible = st.recursive(
    json_scalars | field_names | st.sampled_from(["127.0.42.1", "10.0.0.0/8", "1.2.3.4:80"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(field_names, inner, max_size=5),
    max_leaves=30,
)


def _decode_or_message_error(payload: bytes) -> None:
    try:
        msg = decode_message(payload)
    except MessageError:
        return
    # Whatever decodes must encode again, and be stable from then on.
    again = encode_message(msg)
    assert encode_message(decode_message(again)) == again


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_message_error(payload: bytes) -> None:
    _decode_or_message_error(payload)


@given(json_values)
def test_random_json_values_only_raise_message_error(value: Any) -> None:
    _decode_or_message_error(json.dumps(value).encode())


@given(st.sampled_from(["request", "result", "response", "event", "Request"]), plausible)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_random_bodies_only_raise_message_error(mtype: str, body: Any) -> None:
    _decode_or_message_error(json.dumps({"type": mtype, "body": body}).encode())


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@given(st.sampled_from(WIRE_ALL), st.data())
def test_mutated_recordings_only_raise_message_error(wire: bytes, data: st.DataObject) -> None:
    doc = json.loads(wire)
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    target = doc
    for step in path[:-1]:
        target = target[step]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = data.draw(plausible)
    _decode_or_message_error(json.dumps(doc).encode())


ipv4s = st.ip_addresses(v=4).map(str)
ports = st.integers(0, 65535)
names = st.text(min_size=1, max_size=10)
configure_args = st.builds(
    ConfigureArgs,
    me=ipv4s,
    forwards=st.lists(st.builds(Forward, ports, names, ports, names), max_size=3),
    others=st.lists(st.builds(IPPortProto, ipv4s, ports, names), max_size=3),
    hostname_map=st.dictionaries(st.text(max_size=10), ipv4s, max_size=4),
    http_listen=st.none() | names,
    socks_listen=st.none() | names,
    loopback_disable=st.booleans(),
    state_dir_path=st.none() | names,
    state_dir_disable=st.booleans(),
    write_etc_hosts=st.booleans(),
    routes=st.lists(st.builds(
        Route, ipv4s,
        st.lists(st.builds(lambda ip, n: f"{ip}/{n}", ipv4s, st.integers(0, 32)), max_size=2),
        st.lists(names, max_size=2)), max_size=3),
    name_servers=st.lists(st.builds(IPPortProto, ipv4s, ports, names), max_size=3),
)


@given(st.integers(-(2**63), 2**63 - 1), configure_args)
def test_configure_request_round_trips(req_id: int, args: ConfigureArgs) -> None:
    req = Request(id=req_id, op=OP_CONFIGURE, args=args)
    payload = encode_message(req)
    json.loads(payload)  # valid JSON for any decoder
    assert decode_message(payload) == req


@given(st.integers(0, 2**31), st.lists(st.text(min_size=1), max_size=12), st.text(min_size=1),
       st.none() | json_values.filter(lambda v: v is not None))
def test_result_round_trips(req_id: int, features: list[str], version: str, error: Any) -> None:
    result = Result(request_id=req_id, op=OP_CONFIGURE,
                    data=ConfigureResultData(features=features, version=version), error=error)
    payload = encode_message(result)
    back = decode_message(payload)
    assert isinstance(back, Result)
    assert back.data == result.data and back.request_id == req_id
    assert encode_message(back) == payload


@given(st.lists(ipv4s, max_size=5), ipv4s)
def test_route_suggestion_round_trips(ips: list[str], route: str) -> None:
    event = Event.route_suggestion(ips, route)
    assert decode_message(encode_message(event)) == event


@given(st.text(st.characters(exclude_categories=())))  # surrogates included
def test_strings_survive_like_go(text: str) -> None:
    # Any text (lone surrogates stand for invalid UTF-8) encodes to valid JSON; decoding
    # gives it back with invalid parts as U+FFFD, as Go does.
    payload = encode_message(Result.failure(1, "x", text))
    assert b"<" not in payload and b">" not in payload and b"&" not in payload
    back = decode_message(payload)
    assert isinstance(back, Result)
    expected = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    assert back.error_message == expected
    assert json.loads(payload)["body"]["error"]["message"] == expected
