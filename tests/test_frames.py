"""Frame codec: wire bytes, incremental decoding at every split, and bad streams."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norouter_trio import frames
from norouter_trio.frames import FrameDecoder, FrameError, encode_frame, encode_l3_batch

frame_st = st.tuples(st.sampled_from([1, 2, 3, 0xFFFF]), st.binary(max_size=300))


def test_header_matches_the_wire_example() -> None:
    # wire-examples.md: a 201-byte configure result frame starts 42 00 00 c5 00 02 00 00.
    f = encode_frame(frames.TYPE_JSON, b"x" * 193)
    assert len(f) == 201
    assert f[:8] == bytes.fromhex("420000c500020000")


def test_l3_batch_is_concatenated_frames() -> None:
    pkts = [b"\x45" + bytes(19), b"\x45" + bytes(100)]
    assert encode_l3_batch(pkts) == b"".join(encode_frame(1, p) for p in pkts)


def test_payload_too_big_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_frame(1, bytes(frames.MAX_PAYLOAD + 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(frame_st, max_size=6))
def test_every_split_point_gives_the_same_frames(items: list[tuple[int, bytes]]) -> None:
    stream = b"".join(encode_frame(t, p) for t, p in items)
    for cut in range(len(stream) + 1):
        d = FrameDecoder("peer")
        got = d.feed(stream[:cut]) + d.feed(stream[cut:])
        d.eof()
        assert got == items
        assert d.offset == len(stream)


@settings(max_examples=40, deadline=None)
@given(st.lists(frame_st, min_size=1, max_size=4), st.data())
def test_byte_by_byte_and_random_chunks(items: list[tuple[int, bytes]], data: st.DataObject
                                        ) -> None:
    stream = b"".join(encode_frame(t, p) for t, p in items)
    d = FrameDecoder("peer")
    got: list[tuple[int, bytes]] = []
    for i in range(len(stream)):
        got += d.feed(stream[i:i + 1])
    assert got == items
    d2 = FrameDecoder("peer")
    got2: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(stream):
        n = data.draw(st.integers(1, 512))
        got2 += d2.feed(stream[pos:pos + n])
        pos += n
    d2.eof()
    assert got2 == items


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_garbage_raises_only_frame_error(chunks: list[bytes]) -> None:
    d = FrameDecoder("garbage-peer")
    try:
        for c in chunks:
            for ftype, payload in d.feed(c):
                assert isinstance(ftype, int) and isinstance(payload, bytes)
        d.eof()
    except FrameError as e:
        assert e.peer == "garbage-peer"
        assert "garbage-peer" in str(e) and str(e.offset) in str(e)


def test_bad_magic_names_peer_and_offset() -> None:
    good = encode_frame(1, b"\x45" + bytes(19))
    d = FrameDecoder("web(127.0.42.101)")
    assert len(d.feed(good)) == 1
    with pytest.raises(FrameError) as ei:
        d.feed(b"\x43\x00\x00\x04\x00\x01\x00\x00")
    assert ei.value.offset == len(good)
    assert "web(127.0.42.101)" in str(ei.value)
    assert f"offset {len(good)}" in str(ei.value)
    with pytest.raises(FrameError):  # the stream stays dead
        d.feed(good)


def test_bad_magic_is_seen_on_the_first_byte() -> None:
    with pytest.raises(FrameError) as ei:
        FrameDecoder("p").feed(b"G")
    assert ei.value.offset == 0


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four(length: int) -> None:
    d = FrameDecoder("p")
    with pytest.raises(FrameError, match="below 4"):
        d.feed(bytes([0x42]) + length.to_bytes(3, "big") + b"\x00\x01\x00\x00")


def test_eof_inside_a_frame() -> None:
    f = encode_frame(2, b'{"type":"event"}')
    d = FrameDecoder("bastion(127.0.42.150)")
    d.feed(f + f[:5])
    with pytest.raises(FrameError) as ei:
        d.eof()
    assert ei.value.offset == len(f)
    assert "ended inside a frame" in str(ei.value)


def test_length_exactly_four_is_an_empty_payload() -> None:
    d = FrameDecoder("p")
    assert d.feed(b"\x42\x00\x00\x04\x00\x07\x00\x00") == [(7, b"")]


def test_unknown_type_is_returned() -> None:
    assert FrameDecoder("p").feed(encode_frame(9, b"abc")) == [(9, b"abc")]


def test_feed_raw_spans_cover_whole_frames() -> None:
    a, b = encode_frame(1, b"\x45" + bytes(30)), encode_frame(2, b"{}")
    d = FrameDecoder("p")
    chunk = a + b + a[:3]
    [(buf, spans)] = d.feed_raw(chunk)
    assert buf is chunk  # no copy of the chunk itself
    assert [(t, buf[s:e]) for t, s, e in spans] == [(1, a), (2, b)]
    assert d.buffered == 3
    # the straddling frame gets a group of its own; the rest stays in the new chunk
    chunk2 = a[3:] + b
    groups = d.feed_raw(chunk2)
    assert [(t, g[s:e]) for g, spans in groups for t, s, e in spans] == [(1, a), (2, b)]
    assert groups[1][0] is chunk2
    assert d.offset == 2 * len(a) + 2 * len(b)


@pytest.mark.parametrize(("payload", "ok"), [
    (b"\x45" + bytes(19), True), (b"\x45" + bytes(18), False),
    (b"\x60" + bytes(39), False), (b"", False)])
def test_is_ipv4_packet(payload: bytes, ok: bool) -> None:
    assert frames.is_ipv4_packet(payload) is ok


def test_a_pending_frame_can_be_taken_over() -> None:
    """A switch that splices the rest of a frame takes it from the decoder, which then
    expects the next frame; offsets stay those of the stream."""
    big, small = encode_frame(1, b"\x45" + bytes(999)), encode_frame(2, b"{}")
    d = FrameDecoder("p")
    assert d.feed(small + big[:5]) == [(2, b"{}")]
    assert d.pending_frame() is None  # header not complete yet
    with pytest.raises(ValueError):
        d.take_pending()
    assert d.feed(big[5:30]) == []
    assert d.pending_frame() == (big[:30], len(big))
    assert d.take_pending() == big[:30]
    assert d.pending_frame() is None and d.buffered == 0
    assert d.offset == len(small) + len(big)
    # the rest of big went elsewhere: the next bytes are a new frame
    assert d.feed(small) == [(2, b"{}")]
    d.eof()
    with pytest.raises(FrameError, match="at byte offset 1028: magic"):
        d.feed(b"x")
