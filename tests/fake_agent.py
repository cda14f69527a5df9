"""A fake agent: a small program that speaks frames on stdin/stdout like a real agent.

It is a real peer for the manager tests and the switch benchmark, written without the
package's codec so that it checks the manager against the wire format itself.

Usage (the manager appends ``agent --automated``, which is ignored):
  fake_agent.py [--features tcp,dns] [--version V] [--control FIFO] [--ignore-sigint] [--linger]
                [--no-reply] [--pump DST --size N --count N] [--sink N --size N]
                [--no-configure]

Behaviour: answers the configure request (``--features``, default "tcp"); prints
``pid N`` and, for each L3 packet received, ``recv SRC DST TAG`` on stderr.  With
``--control FIFO`` it reads commands, one per line:
  send DST TAG       an IPv4 packet from its VIP to DST carrying TAG
  short              an L3 frame too short for an IPv4 header
  v6                 an L3 frame whose version nibble is 6
  unknown            a frame of type 9
  suggest IP VIA     a routeSuggestion event
  flood DST N        N packets of 60000 bytes to DST in one write
  stall              stop reading stdin (a stuck agent)
  garbage            bytes that are not a frame
  exit CODE          exit now
``--pump DST`` writes COUNT L3 frames of SIZE bytes to DST as fast as it can (the payload is
pre-built; one write carries many frames).  ``--sink N`` counts received bytes and, after N
frames of SIZE bytes or 2 s without data, prints ``sink FRAMES BYTES SECONDS`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

HDR = struct.Struct(">IHH")
_lock = threading.Lock()
OUT = 1


def frame(ftype: int, payload: bytes) -> bytes:
    return HDR.pack((0x42 << 24) | (len(payload) + 4), ftype, 0) + payload


def write(data: bytes) -> None:
    with _lock:
        view = memoryview(data)
        while view:
            n = os.write(OUT, view)
            view = view[n:]


def ipv4(src: str, dst: str, payload: bytes) -> bytes:
    total = 20 + len(payload)
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, total & 0xFFFF, 0, 0, 64, 253, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + payload


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


class State:
    vip = "0.0.0.0"
    configured = threading.Event()
    stalled = threading.Event()


def control_loop(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if not words:
                continue
            cmd = words[0]
            if cmd == "send":
                write(frame(1, ipv4(State.vip, words[1], words[2].encode())))
            elif cmd == "short":
                write(frame(1, b"\x45\x00\x00"))
            elif cmd == "v6":
                write(frame(1, b"\x60" + bytes(39)))
            elif cmd == "unknown":
                write(frame(9, b"whatever"))
            elif cmd == "suggest":
                ev = {"type": "event", "body": {"type": "routeSuggestion",
                                                "data": {"ip": [words[1]], "route": words[2]}}}
                write(frame(2, json.dumps(ev).encode()))
            elif cmd == "flood":
                one = frame(1, ipv4(State.vip, words[1], b"flood" + bytes(59995)))
                write(one * int(words[2]))
            elif cmd == "stall":
                State.stalled.set()
            elif cmd == "garbage":
                write(b"this is not a frame\n" * 4)
            elif cmd == "exit":
                log(f"exiting with {words[1]}")
                os._exit(int(words[1]))
            log(f"did {line.strip()}")


def pump(dst: str, size: int, count: int) -> None:
    State.configured.wait()
    pkt = ipv4(State.vip, dst, bytes(size - 20))
    one = frame(1, pkt)
    per_write = max(1, (1 << 20) // len(one))
    chunk = one * per_write
    sent = 0
    start = time.monotonic()
    while sent < count:
        n = min(per_write, count - sent)
        write(chunk if n == per_write else one * n)
        sent += n
    log(f"pumped {sent} {time.monotonic() - start:.3f}")


def sink(expected: int, size: int, fd: int, leftover: bytes) -> None:
    """Count bytes only (frames = bytes / frame size): the sink must not be the bottleneck."""
    per = size + 8
    total = len(leftover)
    first = time.monotonic() if total else 0.0
    last = first
    while total < expected * per:
        r, _, _ = select.select([fd], [], [], 2.0)
        if not r:
            if total:
                break
            continue
        data = os.read(fd, 1 << 20)
        if not data:
            break
        now = time.monotonic()
        if not total:
            first = now
        total += len(data)
        last = now
    log(f"sink {total // per} {total} {last - first:.6f}")


def main() -> None:
    global OUT
    p = argparse.ArgumentParser()
    p.add_argument("--features", default="tcp")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--control")
    p.add_argument("--ignore-sigint", action="store_true")
    p.add_argument("--linger", action="store_true", help="keep running after EOF")
    p.add_argument("--no-reply", action="store_true")
    p.add_argument("--no-configure", action="store_true")
    p.add_argument("--vip", default="127.0.42.1")
    p.add_argument("--pump")
    p.add_argument("--sink", type=int)
    p.add_argument("--size", type=int, default=1500)
    p.add_argument("--count", type=int, default=1000)
    args, _rest = p.parse_known_args()
    if args.ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    try:
        import fcntl
        fcntl.fcntl(0, 1031, 1 << 20)
        fcntl.fcntl(1, 1031, 1 << 20)
    except OSError:
        pass
    OUT = 1
    log(f"pid {os.getpid()}")
    if args.control:
        threading.Thread(target=control_loop, args=(args.control,), daemon=True).start()
    if args.pump:
        if args.no_configure:
            State.vip = args.vip
            State.configured.set()
            pump(args.pump, args.size, args.count)
            return
        threading.Thread(target=pump, args=(args.pump, args.size, args.count),
                         daemon=True).start()
    if args.sink is not None and args.no_configure:
        sink(args.sink, args.size, 0, b"")
        return
    buf = b""
    while True:
        if State.stalled.is_set():
            log("stalled")
            while True:  # stop reading stdin until killed
                time.sleep(3600)
        data = os.read(0, 1 << 20)
        if not data:
            log("eof")
            if args.linger:
                while True:  # a stubborn agent: only SIGKILL ends it
                    time.sleep(3600)
            return
        buf += data
        while len(buf) >= 8:
            word, ftype, _ = HDR.unpack_from(buf)
            if word >> 24 != 0x42:
                log("bad magic from the manager")
                sys.exit(3)
            end = 4 + (word & 0xFFFFFF)
            if len(buf) < end:
                break
            payload, buf = buf[8:end], buf[end:]
            if ftype == 2:
                msg = json.loads(payload)
                body = msg["body"]
                if msg["type"] == "request" and body["op"] == "configure":
                    State.vip = body["args"]["me"]
                    log(f"configure {State.vip} id {body['id']}")
                    if not args.no_reply:
                        feats = [f for f in args.features.split(",") if f]
                        res = {"type": "result", "body": {
                            "request_id": body["id"], "op": "configure",
                            "data": {"features": feats, "version": args.version}}}
                        write(frame(2, json.dumps(res).encode()))
                    State.configured.set()
                    if args.sink is not None:
                        sink(args.sink, args.size, 0, buf)
                        return
            elif ftype == 1:
                src = socket.inet_ntoa(payload[12:16])
                dst = socket.inet_ntoa(payload[16:20])
                tag = payload[20:60].rstrip(b"\0").decode(errors="replace")
                log(f"recv {src} {dst} {tag}")


if __name__ == "__main__":
    main()
