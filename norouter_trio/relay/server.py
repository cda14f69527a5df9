"""The live debug view: one page and a websocket feed of the manager's state.

One TCP listener serves both. Each connection is read with h11 first: plain GETs get the
static page, its script and style, or the pcap download; a websocket upgrade is handed, with
the bytes already read, to trio-websocket (`wrap_server_stream`). trio-websocket alone
cannot do this: wsproto answers a GET without `Upgrade` with 400 before any handler runs.

Safety: the listener binds 127.0.0.1 unless told otherwise (anything else is logged as a
warning); a random token, printed in the URL, is required on the websocket and on the pcap
download; the websocket also checks that the page's Origin matches the Host it was served
from. The switch never waits for a browser: every client has a bounded queue, a client whose
queue is full loses events (it is told how many), and a client that cannot take a message
within `stall_timeout` seconds is disconnected.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from . import state
from .observer import RelayObserver
from .pcap import merged, pcap_bytes

log = logging.getLogger("norouter.relay")

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}


@dataclass
class RelayConfig:
    """Tunables; the defaults suit a laptop browser watching a handful of hosts."""

    queue_size: int = 256  # messages per client before it starts losing events
    stall_timeout: float = 5.0  # a client that cannot take one message this long is dropped
    tick: float = 1.0  # counters + flow table period
    packet_flush: float = 0.25  # packet log batching period
    flow_limit: int = 256
    snaplen: int = 256  # bytes of each packet kept for the pcap download
    ring_packets: int = 2000  # per host
    ring_bytes: int = 1 << 20  # per host
    log_rate: float = 100.0  # packet-log entries per second (burst: twice that)
    send_buffer: int = 256 * 1024  # SO_SNDBUF for websocket clients: bounds kernel buffering
    max_clients: int = 16
    handshake_timeout: float = 10.0


class _PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read (the HTTP upgrade request)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Client:
    """One websocket subscriber: a bounded queue and what it has lost."""

    def __init__(self, peer: str, queue_size: int) -> None:
        self.peer = peer
        self.send, self.receive = trio.open_memory_channel[str](queue_size)
        self.lost = 0
        self.reported_lost = 0

    def offer(self, text: str) -> None:
        try:
            self.send.send_nowait(text)
        except trio.WouldBlock:
            self.lost += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_addr(addr: str | None) -> tuple[str, int]:
    """`HOST:PORT`, `HOST`, `:PORT` or `PORT` → (host, port); default 127.0.0.1, a free port."""
    if addr is None or addr == "":
        return "127.0.0.1", 0
    host, port_s = "127.0.0.1", "0"
    if addr.isdigit():
        port_s = addr
    elif addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise ValueError(f"relay address {addr!r}: missing ']' (use [IPV6]:PORT)")
        host, rest = addr[1:end], addr[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"relay address {addr!r}: expected [IPV6]:PORT")
            port_s = rest[1:]
    elif addr.count(":") == 1:
        host, port_s = addr.split(":")
        host = host or "127.0.0.1"
    else:
        host = addr
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"relay address {addr!r}: port must be a number 0-65535 (0 = any free)")
    return host, int(port_s)


class Relay:
    """The relay's state shared by its tasks: observer, clients, token and URL."""

    def __init__(
        self, manager: Any, *, token: str | None = None, config: RelayConfig | None = None
    ) -> None:
        self.manager = manager
        self.config = config or RelayConfig()
        self.token = token or secrets.token_urlsafe(18)
        c = self.config
        self.observer = RelayObserver(
            flow_limit=c.flow_limit,
            snaplen=c.snaplen,
            ring_packets=c.ring_packets,
            ring_bytes=c.ring_bytes,
            log_rate=c.log_rate,
        )
        self.observer.publish = self.publish
        self.clients: set[_Client] = set()
        self.clients_dropped = 0
        self.host = "127.0.0.1"
        self.port = 0
        self.url = ""
        self._allowed_hosts: set[str] | None = None
        self._routes_sent: list[dict[str, Any]] | None = None

    # -- broadcasting ------------------------------------------------------------------

    def publish(self, msg: dict[str, Any]) -> None:
        """Queue `msg` for every client without waiting (a full queue counts as lost)."""
        if not self.clients:
            return
        text = json.dumps(msg, separators=(",", ":"))
        for client in self.clients:
            client.offer(text)

    def snapshot(self) -> dict[str, Any]:
        obs = self.observer
        now = obs.clock()
        return {
            "type": "snapshot",
            "t": now,
            "hosts": state.host_table(self.manager, obs),
            "flows": obs.flows.to_json(now),
            "packets": list(obs.log.recent),
            "events": list(obs.events),
            "routes": state.route_table(self.manager, obs),
            "relay": self._relay_stats(),
            "config": {"tick": self.config.tick, "snaplen": self.config.snaplen},
        }

    def _relay_stats(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "clients_dropped": self.clients_dropped,
            "not_logged": self.observer.log.not_logged,
            "flows_evicted": self.observer.flows.evicted,
        }

    def tick_message(self) -> dict[str, Any]:
        obs = self.observer
        now = obs.clock()
        msg: dict[str, Any] = {
            "type": "tick",
            "t": now,
            "hosts": state.host_table(self.manager, obs),
            "flows": obs.flows.to_json(now),
            "relay": self._relay_stats(),
        }
        routes = state.route_table(self.manager, obs)
        if routes != self._routes_sent:
            self._routes_sent = routes
            msg["routes"] = routes
        return msg

    async def _ticker(self) -> None:
        """Counters and flows every `tick`; the packet log every `packet_flush`."""
        c = self.config
        next_tick = trio.current_time() + c.tick
        while True:
            await trio.sleep(c.packet_flush)
            try:
                packets = self.observer.log.take_pending()
                if packets:
                    self.publish({"type": "packets", "packets": packets})
                now = trio.current_time()
                if now >= next_tick:
                    next_tick = max(next_tick + c.tick, now)
                    if self.clients:
                        self.publish(self.tick_message())
            except Exception:  # a debug view must never take the manager down
                log.exception("relay: failed to build an update; continuing")

    # -- serving -----------------------------------------------------------------------

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sockname = listeners[0].socket.getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}/?token={self.token}"
        if self.host in ("0.0.0.0", "::"):
            self._allowed_hosts = None
        else:
            # Unbracketed IPv6 too: some clients (trio-websocket) send Host like that.
            names = {f"{shown}:{self.port}", f"{self.host}:{self.port}"}
            if _is_loopback(self.host):
                names.add(f"localhost:{self.port}")
            self._allowed_hosts = names
        if hasattr(self.manager, "add_observer"):
            state.backfill(self.manager, self.observer)
            self.manager.add_observer(self.observer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            task_status.started(self)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            await self._handle(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
            log.debug("relay: connection ended: %s", exc)
        except Exception:  # a debug view must never take the manager down
            log.exception("relay: error serving %s", _peer(stream))
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=32 * 1024)
        raw = bytearray()
        event: Any = h11.NEED_DATA
        with trio.move_on_after(self.config.handshake_timeout):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await stream.send_all(_plain(400, f"bad request: {exc}\n"))
                    return
                if event is not h11.NEED_DATA:
                    break
                data = await stream.receive_some(16384)
                raw += data
                conn.receive_data(data)
        if not isinstance(event, h11.Request):
            return
        headers = {k.lower(): v for k, v in event.headers}
        target = event.target.decode("latin-1")
        if b"websocket" in headers.get(b"upgrade", b"").lower():
            await self._websocket(stream, bytes(raw), target, headers)
            return
        if event.method not in (b"GET", b"HEAD"):
            await stream.send_all(_plain(405, "only GET here\n"))
            return
        await stream.send_all(self._http_response(target, headers, event.method == b"HEAD"))

    def _token_ok(self, target: str) -> bool:
        given = parse_qs(urlsplit(target).query).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _origin_problem(self, headers: dict[bytes, bytes]) -> str | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if self._allowed_hosts is not None and host not in self._allowed_hosts:
            return f"Host {host!r} is not this relay ({sorted(self._allowed_hosts)})"
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1") != f"http://{host}":
            return f"Origin {origin.decode('latin-1')!r} is not http://{host}"
        return None

    def _http_response(self, target: str, headers: dict[bytes, bytes], head: bool) -> bytes:
        path = urlsplit(target).path
        if path in _STATIC:
            name, ctype = _STATIC[path]
            body = resources.files(__package__).joinpath("static", name).read_bytes()
            return _response(200, ctype, body, head=head)
        if path == "/pcap":
            if not self._token_ok(target):
                return _plain(403, "token missing or wrong: use the URL from the manager log\n")
            problem = self._origin_problem(headers)
            if problem is not None:
                return _plain(403, f"refused: {problem}\n")
            query = parse_qs(urlsplit(target).query)
            host = query.get("host", [""])[0] or None
            payload = query.get("payload", ["0"])[0] in ("1", "true", "yes")
            packets = merged(self.observer.rings.values(), host)
            body = pcap_bytes(packets, payload=payload, snaplen=self.config.snaplen)
            fname = f"norouter-{host or 'all'}.pcap"
            return _response(
                200,
                "application/vnd.tcpdump.pcap",
                body,
                extra=[("Content-Disposition", f'attachment; filename="{fname}"')],
                head=head,
            )
        if path == "/favicon.ico":
            return _response(204, "text/plain", b"")
        return _plain(404, f"no such page: {path}\n")

    async def _websocket(
        self, stream: trio.SocketStream, raw: bytes, target: str, headers: dict[bytes, bytes]
    ) -> None:
        peer = _peer(stream)
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer)
        async with trio.open_nursery() as nursery:
            request = None
            with trio.move_on_after(self.config.handshake_timeout):
                request = await wrap_server_stream(
                    nursery, _PrefixedStream(stream, raw), max_message_size=64 * 1024
                )
            if request is None:  # wsproto refused the handshake (it answered 400 itself)
                log.warning("relay: bad websocket handshake from %s", peer)
                nursery.cancel_scope.cancel()
                return
            problem = None
            if urlsplit(target).path != "/ws":
                problem = f"no websocket at {urlsplit(target).path}; use /ws"
            elif not self._token_ok(target):
                problem = "token missing or wrong: use the URL from the manager log"
            else:
                problem = self._origin_problem(headers)
            status = 403
            if problem is None and len(self.clients) >= self.config.max_clients:
                problem, status = f"already {len(self.clients)} viewers; close one", 503
            if problem is not None:
                log.warning("relay: refused websocket from %s: %s", peer, problem)
                await request.reject(status, body=f"refused: {problem}\n".encode())
                nursery.cancel_scope.cancel()
                return
            ws = await request.accept()
            client = _Client(peer, self.config.queue_size)
            # Register and snapshot with no await in between: nothing is missed or doubled.
            snapshot = json.dumps(self.snapshot(), separators=(",", ":"))
            self.clients.add(client)
            log.info("relay: client %s connected (%d now)", peer, len(self.clients))
            try:
                nursery.start_soon(_discard_incoming, ws)
                dropped = await self._feed(ws, client, snapshot)
            finally:
                self.clients.discard(client)
                client.send.close()
            if dropped:
                self.clients_dropped += 1
                log.warning(
                    "relay: dropped client %s: it took no data for %.1fs (lost %d events)",
                    peer, self.config.stall_timeout, client.lost,
                )
                await trio.aclose_forcefully(stream)
            else:
                log.info("relay: client %s left", peer)
                with trio.move_on_after(1):
                    await ws.aclose()
            nursery.cancel_scope.cancel()

    async def _feed(self, ws: WebSocketConnection, client: _Client, first: str) -> bool:
        """Send the snapshot, then the queue. True if the client was dropped as stuck."""
        timeout = self.config.stall_timeout
        try:
            with trio.move_on_after(timeout):
                await ws.send_message(first)
                first = ""
            if first:
                return True
            async for text in client.receive:
                if client.lost != client.reported_lost:
                    client.reported_lost = client.lost
                    text_lost = json.dumps({"type": "lost", "count": client.lost})
                    with trio.move_on_after(timeout):
                        await ws.send_message(text_lost)
                        text_lost = ""
                    if text_lost:
                        return True
                sent = False
                with trio.move_on_after(timeout):
                    await ws.send_message(text)
                    sent = True
                if not sent:
                    return True
        except ConnectionClosed:
            pass
        return False


async def _discard_incoming(ws: WebSocketConnection) -> None:
    """Keep trio-websocket's reader moving (pings, close); the page sends nothing we need."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        pass


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _response(
    status: int,
    ctype: str,
    body: bytes,
    *,
    extra: list[tuple[str, str]] | None = None,
    head: bool = False,
) -> bytes:
    reason = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
              404: "Not Found", 405: "Method Not Allowed"}.get(status, "")
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in extra or []]
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head_bytes if head else head_bytes + body


def _plain(status: int, text: str) -> bytes:
    return _response(status, "text/plain; charset=utf-8", text.encode())


async def run_relay(
    manager: Any,
    addr: str | None = None,
    *,
    config: RelayConfig | None = None,
    token: str | None = None,
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the debug view for `manager` on `addr` until cancelled.

    `addr` is `HOST:PORT`, `HOST`, `:PORT` or `PORT` (default 127.0.0.1 and a free port).
    Registers the relay's observer with `manager.add_observer`, logs the URL (with its
    token), and reports the `Relay` through `task_status` once it is listening.
    """
    host, port = parse_addr(addr)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(
            exc.errno, f"relay: cannot listen on {host}:{port}: {exc.strerror}; "
            "choose another --relay HOST:PORT"
        ) from exc
    relay = Relay(manager, token=token, config=config)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve, listeners)
        if not _is_loopback(relay.host):
            log.warning(
                "relay: LISTENING ON %s, NOT LOOPBACK: anyone who can reach this address and "
                "learns the token can watch all traffic metadata and download packets",
                relay.host,
            )
        log.info("relay: debug view at %s", relay.url)
        task_status.started(relay)
