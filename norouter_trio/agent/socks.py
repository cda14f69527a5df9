"""SOCKS proxy on `socks.listen`: SOCKS4, SOCKS4a and SOCKS5 (no auth, CONNECT).

Hand-written: the handshakes are a few fixed-layout messages (SOCKS4 and its 4a
extension as published by their authors, SOCKS5 per RFC 1928) and no maintained library
serves them for trio. Destinations go through `Dialer`, like the HTTP proxy's.

Unsupported requests get the protocol's own refusal (SOCKS4: 91; SOCKS5: 0x07 command not
supported for BIND / UDP ASSOCIATE, 0x08 address type not supported for IPv6, 0xFF for a
method list without "no authentication"), then the connection is closed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import struct
from typing import NoReturn

import trio

from norouter_trio.agent.dialer import (
    ByteReader,
    Dialer,
    DialError,
    Send,
    sender,
    serve_streams,
    splice,
)

log = logging.getLogger(__name__)

SOCKS4_GRANTED = 90
SOCKS4_REJECTED = 91

SOCKS5_NO_AUTH = 0x00
SOCKS5_NO_ACCEPTABLE_METHOD = 0xFF
SOCKS5_CMD_CONNECT = 0x01
SOCKS5_ATYP_IPV4 = 0x01
SOCKS5_ATYP_DOMAIN = 0x03
SOCKS5_ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

_REP_FOR_DIAL_ERROR = {
    "refused": REP_CONNECTION_REFUSED,
    "unreachable": REP_HOST_UNREACHABLE,
    "network": REP_NETWORK_UNREACHABLE,
    "resolve": REP_HOST_UNREACHABLE,
    "timeout": REP_TTL_EXPIRED,
}
_MAX_FIELD = 255  # SOCKS4 user id and 4a host name: at most this many bytes
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class SocksRefused(Exception):
    """The request is answered with `reply` and the connection closed."""

    def __init__(self, reply: bytes, why: str) -> None:
        super().__init__(why)
        self.reply = reply


def socks4_reply(code: int, port: int = 0, ip: str = "0.0.0.0") -> bytes:
    return struct.pack("!BBH4s", 0, code, port, ipaddress.IPv4Address(ip).packed)


def socks5_reply(rep: int, bound: tuple[str, int] | None = None) -> bytes:
    """A reply with an IPv4 bound address (0.0.0.0:0 when unknown or not IPv4)."""
    ip, port = bound if bound is not None else ("0.0.0.0", 0)
    try:
        packed = ipaddress.IPv4Address(ip).packed
    except ValueError:
        packed, port = bytes(4), 0
    return struct.pack("!BBBB4sH", 5, rep, 0, SOCKS5_ATYP_IPV4, packed, port)


async def _socks4_request(reader: ByteReader) -> tuple[str, int, int]:
    """After the version byte: (host, port, command). SOCKS4a when the IP is 0.0.0.x."""
    command, port, raw_ip = struct.unpack("!BH4s", await reader.read_exactly(7))
    try:
        await reader.read_until(b"\0", _MAX_FIELD)  # user id: no authentication here
        host = str(ipaddress.IPv4Address(raw_ip))
        if raw_ip[:3] == b"\0\0\0" and raw_ip[3] != 0:
            name = await reader.read_until(b"\0", _MAX_FIELD)
            host = name.decode("utf-8")
    except (ValueError, UnicodeError) as exc:
        raise SocksRefused(socks4_reply(SOCKS4_REJECTED), f"SOCKS4: {exc}") from None
    if command != 1:
        raise SocksRefused(socks4_reply(SOCKS4_REJECTED), f"SOCKS4: command {command} "
                           "not supported (only CONNECT)")
    if not host or port == 0:
        raise SocksRefused(socks4_reply(SOCKS4_REJECTED), "SOCKS4: empty host or port 0")
    return host, port, command


async def _socks5(send: Send, reader: ByteReader) -> tuple[str, int]:
    """After the version byte: negotiate the method, read the request -> (host, port)."""
    (count,) = await reader.read_exactly(1)
    methods = await reader.read_exactly(count)
    if SOCKS5_NO_AUTH not in methods:
        raise SocksRefused(bytes([5, SOCKS5_NO_ACCEPTABLE_METHOD]),
                           f"SOCKS5: no acceptable method in {list(methods)}")
    await send(bytes([5, SOCKS5_NO_AUTH]))
    version, command, _reserved, atyp = await reader.read_exactly(4)
    if version != 5:
        raise SocksRefused(socks5_reply(REP_GENERAL_FAILURE),
                           f"SOCKS5: request has version {version}")
    if atyp == SOCKS5_ATYP_IPV4:
        host = str(ipaddress.IPv4Address(await reader.read_exactly(4)))
    elif atyp == SOCKS5_ATYP_DOMAIN:
        (size,) = await reader.read_exactly(1)
        raw = await reader.read_exactly(size)
        try:
            host = raw.decode("utf-8")
        except UnicodeError:
            raise SocksRefused(socks5_reply(REP_GENERAL_FAILURE),
                               "SOCKS5: undecodable host name") from None
        if not host:
            raise SocksRefused(socks5_reply(REP_GENERAL_FAILURE), "SOCKS5: empty host name")
    elif atyp == SOCKS5_ATYP_IPV6:
        raise SocksRefused(socks5_reply(REP_ADDRESS_TYPE_NOT_SUPPORTED),
                           "SOCKS5: IPv6 destinations are not supported")
    else:
        raise SocksRefused(socks5_reply(REP_ADDRESS_TYPE_NOT_SUPPORTED),
                           f"SOCKS5: unknown address type {atyp}")
    (port,) = struct.unpack("!H", await reader.read_exactly(2))
    if command != SOCKS5_CMD_CONNECT:
        raise SocksRefused(socks5_reply(REP_COMMAND_NOT_SUPPORTED),
                           f"SOCKS5: command {command} not supported (only CONNECT)")
    return host, port


def _bound_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The local address of the outgoing connection, if the stream can tell."""
    local = getattr(stream, "local_address", None)
    if isinstance(local, tuple) and len(local) >= 2:
        return str(local[0]), int(local[1])
    sock = getattr(stream, "socket", None)
    if sock is not None:
        try:
            name = sock.getsockname()
        except OSError:
            return None
        return str(name[0]), int(name[1])
    return None


async def handle_socks_connection(stream: trio.abc.Stream, dialer: Dialer, *,
                                  handshake_timeout: float = 30.0) -> None:
    """Serve one SOCKS client: handshake (bounded in time), dial, then splice."""
    reader = ByteReader(stream, chunk=4096)
    send = sender(stream)
    version = 0
    upstream: trio.abc.Stream | None = None
    spliced = False  # splice closes both streams itself
    try:
        with trio.fail_after(handshake_timeout):
            (version,) = await reader.read_exactly(1)
            if version == 4:
                host, port, _ = await _socks4_request(reader)
            elif version == 5:
                host, port = await _socks5(send, reader)
            else:
                log.info("SOCKS: unknown version %d: closing", version)
                return
            try:
                # What the client sent without waiting for our reply goes with the dial.
                upstream = await dialer.dial(host, port, initial_data=reader.take_buffered())
            except DialError as exc:
                reply = (socks4_reply(SOCKS4_REJECTED) if version == 4
                         else socks5_reply(_REP_FOR_DIAL_ERROR[exc.code]))
                raise SocksRefused(reply, f"SOCKS{version}: {exc}") from None
            if version == 4:
                await send(socks4_reply(SOCKS4_GRANTED))
            else:
                await send(socks5_reply(REP_SUCCEEDED, _bound_address(upstream)))
        log.debug("SOCKS%d: connected to %s:%d", version, host, port)
        connected, upstream, spliced = upstream, None, True
        await splice(stream, connected)
    except SocksRefused as exc:
        log.info("%s", exc)
        await _try_send(send, exc.reply)
    except trio.TooSlowError:
        log.info("SOCKS: handshake not finished within %gs: closing", handshake_timeout)
        await _try_send(send, _failure_reply(version))
    except EOFError:
        log.info("SOCKS%s: client closed in the middle of the handshake",
                 version or "")
        await _try_send(send, _failure_reply(version))
    except _STREAM_ERRORS as exc:
        log.debug("SOCKS: client connection ended: %s", exc or type(exc).__name__)
    finally:
        if upstream is not None:
            await trio.aclose_forcefully(upstream)
        if not spliced:
            await trio.aclose_forcefully(stream)


def _failure_reply(version: int) -> bytes:
    if version == 4:
        return socks4_reply(SOCKS4_REJECTED)
    if version == 5:
        return socks5_reply(REP_GENERAL_FAILURE)
    return b""


async def _try_send(send: Send, data: bytes) -> None:
    if not data:
        return
    with contextlib.suppress(*_STREAM_ERRORS), trio.move_on_after(1):
        await send(data)


async def serve_socks(listener: trio.abc.Listener[trio.abc.Stream], dialer: Dialer, *,
                      handshake_timeout: float = 30.0) -> NoReturn:
    """Serve the SOCKS4/4a/5 proxy on `listener` (an OS listener on `socks.listen`) forever.

    `dialer` decides stack or OS per destination; a handshake that takes longer than
    `handshake_timeout` seconds is refused and closed.
    """
    async def handler(stream: trio.abc.Stream) -> None:
        try:
            await handle_socks_connection(stream, dialer, handshake_timeout=handshake_timeout)
        except Exception:
            log.exception("SOCKS: connection handler failed")
            await trio.aclose_forcefully(stream)

    await serve_streams(listener, handler, "SOCKS proxy")
