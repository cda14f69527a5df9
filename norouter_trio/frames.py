"""Sans-IO codec for NoRouter's stdio frames.

Wire format (how-it-works.md): ``0x42``, uint24be length of what follows (type + reserved +
payload), uint16be type (1 = L3, 2 = JSON), uint16be 0, payload.  A frame is ``4 + length``
bytes.  The decoder is incremental (feed any split of the stream, get whole frames) and never
raises anything but :class:`FrameError` on bad input, because a peer that sends garbage must
end its own stream with a readable message, not crash the process that reads it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

MAGIC = 0x42
TYPE_L3 = 1
TYPE_JSON = 2
HEADER_LEN = 8
#: The length field counts type + reserved + payload, so the payload may be this long.
MAX_PAYLOAD = 0xFFFFFF - 4
#: The smallest IPv4 header; shorter L3 payloads are dropped by readers.
MIN_IPV4_LEN = 20

_HEADER = struct.Struct(">IHH")
_WORD_TYPE = struct.Struct(">IH")


class FrameError(Exception):
    """The stream from ``peer`` is unusable from byte ``offset`` on (bad magic, length, or EOF)."""

    def __init__(self, peer: str, offset: int, reason: str) -> None:
        super().__init__(f"bad frame stream from {peer} at byte offset {offset}: {reason}")
        self.peer = peer
        self.offset = offset
        self.reason = reason


def frame_header(ftype: int, payload_len: int) -> bytes:
    """The 8-byte header for a payload of ``payload_len`` bytes."""
    if not 0 <= payload_len <= MAX_PAYLOAD:
        raise ValueError(f"frame payload of {payload_len} bytes does not fit (max {MAX_PAYLOAD})")
    return _HEADER.pack((MAGIC << 24) | (payload_len + 4), ftype, 0)


def encode_frame(ftype: int, payload: bytes) -> bytes:
    """One whole frame."""
    return frame_header(ftype, len(payload)) + payload


def encode_l3_batch(packets: Iterable[bytes]) -> bytes:
    """Many L3 frames in one buffer, so that a writer can hand them to one ``write`` call."""
    pack = _HEADER.pack
    head = (MAGIC << 24) | 4
    parts: list[bytes] = []
    append = parts.append
    for p in packets:
        n = len(p)
        if n > MAX_PAYLOAD:
            raise ValueError(f"L3 packet of {n} bytes does not fit in a frame")
        append(pack(head + n, TYPE_L3, 0))
        append(p)
    return b"".join(parts)


def is_ipv4_packet(payload: bytes) -> bool:
    """Whether an L3 payload can be an IPv4 packet (long enough, version 4); else drop it."""
    return len(payload) >= MIN_IPV4_LEN and payload[0] >> 4 == 4


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get ``(type, payload)`` pairs.

    ``offset`` is the number of stream bytes consumed (whole frames); errors name it and the
    peer.  After a :class:`FrameError` the decoder stays broken: the stream cannot be resynced.
    """

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.offset = 0
        self._buf = b""
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back as the start of an incomplete frame."""
        return len(self._buf)

    def _fail(self, offset: int, reason: str) -> FrameError:
        self._error = FrameError(self.peer, offset, reason)
        return self._error

    def feed_raw(self, data: bytes) -> list[tuple[bytes, list[tuple[int, int, int]]]]:
        """Parse without copying: return ``(buffer, [(type, start, end), ...])`` groups.

        Each span covers one whole frame, header included, inside its buffer, so a switch
        can forward runs of frames as one slice.  ``data`` itself is the buffer of the
        last group: only a frame that straddles two reads is copied (into a group of its
        own).  Frames parsed before an error are lost with it; the stream is dead anyway.
        """
        if self._error is not None:
            raise self._error
        groups: list[tuple[bytes, list[tuple[int, int, int]]]] = []
        pos = 0
        if self._buf:
            head = self._buf
            need = HEADER_LEN - len(head)
            if need > 0:  # complete the header first
                head += data[:need]
                pos = min(need, len(data))
                if len(head) < HEADER_LEN:
                    self._check_partial(head, 0)
                    self._buf = head
                    return groups
            self._check_partial(head, 0)
            total = 4 + (int.from_bytes(head[1:4], "big"))
            more = total - len(head)
            if more > len(data) - pos:
                self._buf = head + data[pos:]
                return groups
            frame = head + data[pos:pos + more]
            pos += more
            groups.append((frame, [(_WORD_TYPE.unpack_from(frame)[1], 0, total)]))
            self.offset += total
            self._buf = b""
        spans, pos = self._scan(data, pos)
        if spans:
            groups.append((data, spans))
        self._buf = data[pos:]
        return groups

    def _check_partial(self, buf: bytes, pos: int) -> None:
        """Validate what is known of an incomplete frame's header at ``buf[pos:]``."""
        n = len(buf) - pos
        if n >= 1 and buf[pos] != MAGIC:
            raise self._fail(self.offset, f"magic byte is 0x{buf[pos]:02x}, not 0x42")
        if n >= 4 and int.from_bytes(buf[pos + 1:pos + 4], "big") < 4:
            raise self._fail(self.offset, "length field is below 4")

    def _scan(self, buf: bytes, pos: int) -> tuple[list[tuple[int, int, int]], int]:
        """Whole frames from ``buf[pos:]``; returns the spans and where the rest starts."""
        n = len(buf)
        base = self.offset - pos  # stream offset of buf[0]
        spans: list[tuple[int, int, int]] = []
        append = spans.append
        unpack = _WORD_TYPE.unpack_from
        while n - pos >= HEADER_LEN:
            word, ftype = unpack(buf, pos)
            if word >> 24 != MAGIC:
                raise self._fail(base + pos, f"magic byte is 0x{word >> 24:02x}, not 0x42")
            length = word & 0xFFFFFF
            if length < 4:
                raise self._fail(base + pos, f"length field {length} is below 4")
            end = pos + 4 + length
            if end > n:
                break
            append((ftype, pos, end))
            pos = end
        self.offset = base + pos
        self._check_partial(buf, pos)
        return spans, pos

    def pending_frame(self) -> tuple[bytes, int] | None:
        """The buffered start of an incomplete frame and the frame's whole length, once
        its header has arrived (a switch may then move the rest of it without parsing)."""
        buf = self._buf
        if len(buf) < HEADER_LEN or self._error is not None:
            return None
        return buf, 4 + int.from_bytes(buf[1:4], "big")

    def take_pending(self) -> bytes:
        """Give up the incomplete frame: return its buffered start and count the whole
        frame as consumed.  The caller moves the remaining bytes past the decoder (e.g.
        ``os.splice``), so the next byte fed must be the start of the next frame."""
        pending = self.pending_frame()
        if pending is None:
            raise ValueError("no incomplete frame with a whole header is buffered")
        self.offset += pending[1]
        self._buf = b""
        return pending[0]

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Feed stream bytes; return the frames completed by them as ``(type, payload)``."""
        return [(ftype, buf[start + HEADER_LEN:end])
                for buf, spans in self.feed_raw(data) for ftype, start, end in spans]

    def eof(self) -> None:
        """The stream ended: raise :class:`FrameError` if it stopped inside a frame."""
        if self._error is not None:
            raise self._error
        if self._buf:
            raise self._fail(
                self.offset, f"stream ended inside a frame ({len(self._buf)} bytes of it received)")
