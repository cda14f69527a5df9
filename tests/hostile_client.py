"""Malformed protocol input for an agent's DNS, HTTP proxy and SOCKS listeners.

    python3 tests/hostile_client.py dns IP:PORT [--name NAME --ip IP]
    python3 tests/hostile_client.py http IP:PORT
    python3 tests/hostile_client.py socks IP:PORT
    python3 tests/hostile_client.py longnames http=IP:PORT socks=IP:PORT
    python3 tests/hostile_client.py hold PROTO=IP:PORT ... [--count N] [--seconds S]

Each of `dns`, `http`, `socks` sends a list of hostile inputs (truncated, oversized,
wrong versions), one connection each, and checks that every one is answered as its
protocol says or simply closed, within a bound; it prints one line per case and exits 1
if any case failed. `hold` opens N connections per listener that stop half-way through a
handshake and keeps them open (printing `HOLDING`), so that a scenario can show the agent
serving real clients meanwhile. Stdlib only: it starts fast inside any namespace.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

TIMEOUT = 10.0  # per case: an answer or a close must come within this
Check = Callable[[bytes], str | None]  # reply bytes -> None if fine, else what is wrong


@dataclass
class Case:
    name: str
    payload: bytes
    check: Check


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def exchange(addr: str, payload: bytes) -> tuple[bytes, str]:
    """Send `payload` and a FIN (the input ends there), read until the server closes;
    (reply, how it ended)."""
    with socket.create_connection(split_addr(addr), timeout=TIMEOUT) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it has read everything
        reply = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = s.recv(65536)
            except TimeoutError:
                return bytes(reply), "timeout"
            except ConnectionResetError:
                return bytes(reply), "reset"
            if not data:
                return bytes(reply), "closed"
            reply += data


def run_cases(addr: str, cases: list[Case]) -> int:
    failed = 0
    for c in cases:
        t0 = time.monotonic()
        try:
            reply, how = exchange(addr, c.payload)
        except OSError as e:
            print(f"FAIL {c.name}: {addr}: {e}", flush=True)
            failed += 1
            continue
        problem = c.check(reply) or (None if how in ("closed", "reset")
                                     else f"connection not closed within {TIMEOUT}s")
        took = time.monotonic() - t0
        shown = reply[:48]
        if problem:
            failed += 1
            print(f"FAIL {c.name}: {problem} (got {len(reply)} bytes {shown!r}, {how})",
                  flush=True)
        else:
            print(f"ok {c.name}: {len(reply)} bytes {shown!r}, {how} in {took:.2f}s",
                  flush=True)
    print(f"{'FAILED' if failed else 'ALL OK'}: {len(cases) - failed}/{len(cases)} cases "
          f"against {addr}", flush=True)
    return 1 if failed else 0


def nothing(reply: bytes) -> str | None:
    return None if not reply else "expected no answer, only a close"


def starts(prefix: bytes) -> Check:
    def check(reply: bytes) -> str | None:
        return None if reply.startswith(prefix) else f"expected a reply starting {prefix!r}"
    return check


# ------------------------------------------------------------------------- DNS

def dns_header(qid: int, flags: int, qd: int = 1, an: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, 0, 0)


def dns_question(name: str, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".") if p)
    return labels + b"\0" + struct.pack("!HH", qtype, 1)


def framed(msg: bytes) -> bytes:
    return len(msg).to_bytes(2, "big") + msg


def dns_replies(stream: bytes) -> list[bytes]:
    """Split length-prefixed DNS messages (a cut-off tail is returned as it is)."""
    out = []
    while len(stream) >= 2:
        n = int.from_bytes(stream[:2], "big")
        out.append(stream[2:2 + n])
        stream = stream[2 + n:]
    return out


def dns_rcode(qid: int, rcode: int) -> Check:
    def check(reply: bytes) -> str | None:
        msgs = dns_replies(reply)
        if len(msgs) != 1 or len(msgs[0]) < 12:
            return f"expected one DNS answer (rcode {rcode})"
        rid, flags = struct.unpack_from("!HH", msgs[0])
        if rid != qid or not flags & 0x8000 or flags & 0xF != rcode:
            return f"expected id {qid:#x}, QR, rcode {rcode}; got id {rid:#x} flags {flags:#x}"
        return None
    return check


def dns_cases(name: str, ip: str) -> list[Case]:
    rd = 0x0100
    good = dns_header(0x4242, rd) + dns_question(name)
    want = socket.inet_aton(ip)

    def garbage_then_good(reply: bytes) -> str | None:
        msgs = dns_replies(reply)
        if len(msgs) != 2:
            return f"expected FORMERR then an answer, got {len(msgs)} message(s)"
        first = dns_rcode(0xBEEF, 1)(framed(msgs[0]))
        if first:
            return f"first: {first}"
        a = msgs[1]
        if a[:2] != b"\x42\x42" or struct.unpack_from("!H", a, 6)[0] < 1 or want not in a:
            return f"second: expected an A answer {ip} for {name}"
        return None

    return [
        Case("garbage after a header -> FORMERR",
             framed(dns_header(0xBEEF, rd) + b"\xff\xfe\xfd not a question"),
             dns_rcode(0xBEEF, 1)),
        Case("garbage shorter than a header -> nothing", framed(b"abc"), nothing),
        Case("truncated length prefix -> closed", b"\x00", nothing),
        Case("length 65535, 100 bytes sent -> closed", b"\xff\xff" + bytes(100), nothing),
        Case("65535-byte message of junk -> FORMERR",
             framed(dns_header(0xBEEF, rd) + b"\xc0" * (65535 - 12)), dns_rcode(0xBEEF, 1)),
        Case("a response sent as a query -> nothing",
             framed(dns_header(0x1111, 0x8000 | rd) + dns_question(name)), nothing),
        Case("opcode STATUS -> NOTIMP",
             framed(dns_header(0x2222, (2 << 11) | rd) + dns_question(name)),
             dns_rcode(0x2222, 4)),
        Case("two questions -> FORMERR",
             framed(dns_header(0x3333, rd, qd=2) + dns_question(name) + dns_question(name)),
             dns_rcode(0x3333, 1)),
        Case("garbage, then a good query on the same connection",
             framed(dns_header(0xBEEF, rd) + b"\xff junk") + framed(good), garbage_then_good),
    ]


# ------------------------------------------------------------------------ HTTP

def http_status(code: int) -> Check:
    return starts(f"HTTP/1.1 {code} ".encode())


def http_cases() -> list[Case]:
    big = b"X-Filler: " + b"a" * (70 * 1024) + b"\r\n"
    return [
        Case("garbage request line -> 400", b"\x16\x03\x01\x02\x00\x01\xfc garbage\r\n\r\n",
             http_status(400)),
        Case("origin-form target -> 400", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
             http_status(400)),
        Case("HTTP/2.0 request line -> 400",
             b"GET http://127.0.0.1:9/ HTTP/2.0\r\nHost: x\r\n\r\n", http_status(400)),
        Case("HTTP/0.9-style request line -> 400", b"GET http://127.0.0.1:9/\r\n\r\n",
             http_status(400)),
        Case("malformed header line -> 400",
             b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
             http_status(400)),
        Case("70 KiB of headers -> 431",
             b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n",
             http_status(431)),
        Case("70 KiB request line, no end -> 431",
             b"GET http://127.0.0.1:9/" + b"a" * (70 * 1024), http_status(431)),
        Case("head cut short -> 400", b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0",
             http_status(400)),
        Case("CONNECT without a port -> 400", b"CONNECT nonsense HTTP/1.1\r\nHost: x\r\n\r\n",
             http_status(400)),
        Case("CONNECT port 99999 -> 400",
             b"CONNECT 127.0.0.1:99999 HTTP/1.1\r\nHost: x\r\n\r\n", http_status(400)),
        Case("CONNECT without a host -> 400", b"CONNECT :80 HTTP/1.1\r\nHost: x\r\n\r\n",
             http_status(400)),
        Case("Transfer-Encoding: gzip -> 501",
             b"POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
             http_status(501)),
        Case("bad chunk size -> 400 or closed",
             b"POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
             b"\r\n\r\nzz\r\n", lambda r: None if not r or r.startswith(b"HTTP/1.1 4")
             or r.startswith(b"HTTP/1.1 5") else "expected an error status or a close"),
    ]


# ----------------------------------------------------------------------- SOCKS

def socks5_failed(reply: bytes) -> str | None:
    if len(reply) >= 4 and reply[:3] == b"\x05\x00\x05" and reply[3] != 0:
        return None
    return "expected 05 00 (no authentication) then a SOCKS5 failure reply"


def socks_cases() -> list[Case]:
    hello = b"\x05\x01\x00"  # version 5, one method: no authentication
    ipv4_req = b"\x01\x7f\x00\x00\x01\x00\x09"  # atyp 1, 127.0.0.1, port 9
    return [
        Case("version 9 -> closed, no answer", b"\x09\x01\x00\x00", nothing),
        Case("version 0 -> closed, no answer", b"\x00" * 9, nothing),
        Case("SOCKS5 empty method list -> 05 FF", b"\x05\x00", starts(b"\x05\xff")),
        Case("SOCKS5 only user/password -> 05 FF", b"\x05\x01\x02", starts(b"\x05\xff")),
        Case("SOCKS5 method list cut short -> closed",
             b"\x05\x05\x00", lambda r: None if not r or r.startswith(b"\x05\x01")
             else "expected nothing or a SOCKS5 failure reply"),
        Case("SOCKS5 truncated request -> general failure",
             hello + b"\x05\x01\x00\x03\x10abc", starts(b"\x05\x00\x05\x01")),
        Case("SOCKS5 request with version 4 -> general failure",
             hello + b"\x04\x01\x00" + ipv4_req, starts(b"\x05\x00\x05\x01")),
        Case("SOCKS5 address type 9 -> 08", hello + b"\x05\x01\x00\x09" + bytes(6),
             starts(b"\x05\x00\x05\x08")),
        Case("SOCKS5 IPv6 -> 08", hello + b"\x05\x01\x00\x04" + bytes(18),
             starts(b"\x05\x00\x05\x08")),
        Case("SOCKS5 BIND -> 07", hello + b"\x05\x02\x00" + ipv4_req,
             starts(b"\x05\x00\x05\x07")),
        Case("SOCKS5 empty host name -> general failure",
             hello + b"\x05\x01\x00\x03\x00\x00\x50", starts(b"\x05\x00\x05\x01")),
        Case("SOCKS4 truncated -> 5B", b"\x04\x01\x00", starts(b"\x00\x5b")),
        Case("SOCKS4 300-byte user id -> 5B",
             b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300, starts(b"\x00\x5b")),
        Case("SOCKS4 BIND -> 5B", b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00",
             starts(b"\x00\x5b")),
    ]


def longname_cases(proto: str) -> list[Case]:
    """Host names no resolver accepts (a label over 63 bytes, a SOCKS4a name over 255):
    refused the way each protocol refuses an unreachable destination."""
    if proto == "http":
        return [
            Case("a 100-byte label in the host name -> 502",
                 b"GET http://" + b"l" * 100 + b".test/ HTTP/1.1\r\nHost: x\r\n\r\n",
                 http_status(502)),
            Case("CONNECT to a 100-byte label -> 502",
                 b"CONNECT " + b"l" * 100 + b".test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
                 http_status(502)),
        ]
    hello = b"\x05\x01\x00"
    return [
        Case("SOCKS5 host name with a 100-byte label -> a failure reply",
             hello + b"\x05\x01\x00\x03\x69" + b"l" * 100 + b".test\x00\x50",
             socks5_failed),
        Case("SOCKS4a 300-byte host name -> 5B",
             b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * 300 + b"\x00",
             starts(b"\x00\x5b")),
    ]


# ------------------------------------------------------------------------ hold

PARTIAL = {
    "dns": b"\x00\x40" + dns_header(0x5555, 0x0100),  # 12 of 64 announced bytes
    "http": b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
    "socks": b"\x05\x01\x00\x05\x01\x00\x03\x20abc",  # a host name 3 of 32 bytes long
}


def hold(targets: list[str], count: int, seconds: float) -> int:
    """Open `count` connections per PROTO=IP:PORT, each stopped mid-handshake."""
    socks: list[socket.socket] = []
    for t in targets:
        proto, _, addr = t.partition("=")
        if proto not in PARTIAL:
            print(f"hold: {t!r}: use dns=IP:PORT, http=IP:PORT or socks=IP:PORT", flush=True)
            return 2
        for _ in range(count):
            s = socket.create_connection(split_addr(addr), timeout=TIMEOUT)
            s.sendall(PARTIAL[proto])
            socks.append(s)
    print(f"HOLDING {len(socks)} half-finished connections", flush=True)
    time.sleep(seconds)  # the point is to keep them open this long
    open_now = 0
    for s in socks:
        s.setblocking(False)
        try:
            s.recv(1)  # EOF or an error reply: the server gave up on it
        except BlockingIOError:
            open_now += 1  # nothing to read: still waiting for the rest
        except OSError:
            pass
        s.close()
    print(f"RELEASED {len(socks)} ({open_now} still open)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="proto", required=True)
    d = sub.add_parser("dns", help="DNS over TCP (the built-in DNS, VIP:10053)")
    d.add_argument("addr")
    d.add_argument("--name", default="host0", help="a name the server answers")
    d.add_argument("--ip", default="127.0.42.100", help="its address")
    sub.add_parser("http", help="the HTTP proxy").add_argument("addr")
    sub.add_parser("socks", help="the SOCKS proxy").add_argument("addr")
    ln = sub.add_parser("longnames", help="over-long host names through both proxies")
    ln.add_argument("targets", nargs="+", metavar="http|socks=IP:PORT")
    h = sub.add_parser("hold", help="keep half-finished handshakes open")
    h.add_argument("targets", nargs="+", metavar="PROTO=IP:PORT")
    h.add_argument("--count", type=int, default=10)
    h.add_argument("--seconds", type=float, default=60.0)
    ns = p.parse_args(argv)
    if ns.proto == "dns":
        return run_cases(ns.addr, dns_cases(ns.name, ns.ip))
    if ns.proto == "http":
        return run_cases(ns.addr, http_cases())
    if ns.proto == "socks":
        return run_cases(ns.addr, socks_cases())
    if ns.proto == "longnames":
        status = 0
        for t in ns.targets:
            proto, _, addr = t.partition("=")
            if proto not in ("http", "socks"):
                print(f"longnames: {t!r}: use http=IP:PORT or socks=IP:PORT", flush=True)
                return 2
            status |= run_cases(addr, longname_cases(proto))
        return status
    return hold(ns.targets, ns.count, ns.seconds)


if __name__ == "__main__":
    sys.exit(main())
