"""Kernel-side TCP peer for the TUN-bridge tests, run inside the test namespace.

The Linux kernel is the reference TCP; this script only drives its sockets. It opens one
connection (`--listen IP:PORT` accepts one, `--connect IP:PORT` dials) and then runs the
steps given on the command line, in order, printing one event line per step on stdout so
the test can follow along without sleeping:

    send:N:SEED   send N pseudo-random bytes (random.Random(SEED))  -> "sent N SECONDS"
    recv          read until EOF                                     -> "received N SHA256 SECONDS"
    recvn:N       read exactly N bytes                               -> "received N SHA256 SECONDS"
    shut          shutdown(SHUT_WR): our FIN, half-close              -> "shut"
    wait          block until a line arrives on stdin                -> "waiting", later "resumed"
    close         close the socket                                   -> "closed"
    abort         close with SO_LINGER 0, which sends RST            -> "aborted"
    duplex:N:SEED send N bytes then FIN (a thread) while reading to EOF
                  -> "duplex SENT RECEIVED SHA256"

Other lines: "listening PORT", "connected LOCAL PEER", "refused", "error TYPE MESSAGE",
"done" last. Usage: python3 tun_peer.py (--listen|--connect) IP:PORT [--rcvbuf N]
[--cc cubic] [--timeout S] STEP...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import socket
import struct
import sys
import threading
import time

CHUNK = 1 << 20


def payload(n: int, seed: int) -> bytes:
    """The bytes both sides agree on for (n, seed); the test side uses the same function."""
    return random.Random(seed).randbytes(n)


def say(*words: object) -> None:
    print(*words, flush=True)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def new_socket(args: argparse.Namespace) -> socket.socket:
    """A TCP socket with the chosen congestion control (accepted sockets inherit it)."""
    sock = socket.socket()
    if args.cc:
        # Root may pick any built-in algorithm per socket, even where the namespace's
        # sysctl may not; a kernel without it keeps its default.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
    if args.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    return sock


def open_socket(args: argparse.Namespace) -> socket.socket:
    if args.listen:
        srv = new_socket(args)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(_addr(args.listen))
        srv.listen(1)
        srv.settimeout(args.timeout)
        say("listening", srv.getsockname()[1])
        sock, _ = srv.accept()
        srv.close()
    else:
        sock = new_socket(args)
        sock.settimeout(args.timeout)
        sock.connect(_addr(args.connect))
    sock.settimeout(args.timeout)
    local, peer = sock.getsockname(), sock.getpeername()
    say("connected", f"{local[0]}:{local[1]}", f"{peer[0]}:{peer[1]}")
    return sock


def duplex(sock: socket.socket, n: int, seed: int) -> None:
    """Both directions at once: a thread sends (then FIN) while this one reads to EOF."""
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            sock.sendall(payload(n, seed))
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    thread = threading.Thread(target=sender)
    thread.start()
    digest, count = hashlib.sha256(), 0
    while data := sock.recv(CHUNK):
        digest.update(data)
        count += len(data)
    thread.join()
    if errors:
        raise errors[0]
    say("duplex", n, count, digest.hexdigest())


def receive(sock: socket.socket, limit: int | None) -> None:
    digest, count, started = hashlib.sha256(), 0, None
    while limit is None or count < limit:
        want = CHUNK if limit is None else min(CHUNK, limit - count)
        data = sock.recv(want)
        if started is None:
            started = time.monotonic()
        if not data:
            if limit is not None:
                raise EOFError(f"EOF after {count} of {limit} bytes")
            break
        digest.update(data)
        count += len(data)
    elapsed = time.monotonic() - started if started is not None else 0.0
    say("received", count, digest.hexdigest(), f"{elapsed:.6f}")


def run_step(sock: socket.socket, step: str) -> None:
    name, *params = step.split(":")
    if name == "send":
        data = payload(int(params[0]), int(params[1]))
        started = time.monotonic()
        sock.sendall(data)
        say("sent", len(data), f"{time.monotonic() - started:.6f}")
    elif name == "recv":
        receive(sock, None)
    elif name == "recvn":
        receive(sock, int(params[0]))
    elif name == "shut":
        sock.shutdown(socket.SHUT_WR)
        say("shut")
    elif name == "wait":
        say("waiting")
        sys.stdin.readline()
        say("resumed")
    elif name == "close":
        sock.close()
        say("closed")
    elif name == "duplex":
        duplex(sock, int(params[0]), int(params[1]))
    elif name == "abort":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        say("aborted")
    else:
        raise ValueError(f"unknown step {step!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="IP:PORT")
    where.add_argument("--connect", metavar="IP:PORT")
    parser.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF before connecting")
    parser.add_argument("--timeout", type=float, default=60.0, help="per socket call")
    parser.add_argument("--cc", default="cubic", help="TCP congestion control ('' = default)")
    parser.add_argument("steps", nargs="*")
    args = parser.parse_args()
    try:
        sock = open_socket(args)
        for step in args.steps:
            run_step(sock, step)
    except ConnectionRefusedError:
        say("refused")
        return 0
    except Exception as exc:  # reported to the test as one line, which names it
        say("error", type(exc).__name__, str(exc).replace("\n", " "))
        return 1
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
