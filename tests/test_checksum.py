"""The fast checksum paths agree with the RFC 1071 reference loop, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norouter_trio.tcp import checksum as ck

# Odd and even lengths, small and past the numpy threshold and the folding cut-off.
data_st = st.one_of(
    st.binary(max_size=80),
    st.binary(min_size=ck.NUMPY_THRESHOLD - 3, max_size=ck.NUMPY_THRESHOLD + 40),
    st.binary(min_size=4000, max_size=4400),
)
# Buffers made of only 0x00 / 0xFF bytes hit the two zeros of one's complement.
edge_st = st.lists(st.sampled_from([0x00, 0xFF]), max_size=3000).map(bytes)


@pytest.fixture(params=["pure", "numpy"])
def accel(request: pytest.FixtureRequest) -> object:
    if request.param == "numpy":
        pytest.importorskip("numpy")
        ck.set_numpy(True)
    else:
        ck.set_numpy(False)
    yield request.param
    ck.set_numpy(True)


@settings(max_examples=100, deadline=None)
@given(data=st.one_of(data_st, edge_st))
def test_checksum_matches_rfc1071(data: bytes) -> None:
    ref = ck.rfc1071_reference(data)
    for enabled in (False, True):
        ck.set_numpy(enabled)
        assert ck.checksum(data) == ref
        assert ck.checksum(memoryview(data)) == ref
        assert ck.checksum(bytearray(data)) == ref
    ck.set_numpy(True)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4096, 4097, 65535, 65536])
def test_zero_and_ffff_cases(accel: object, length: int) -> None:
    zeros = bytes(length)
    ones = b"\xff" * length
    assert ck.checksum(zeros) == ck.rfc1071_reference(zeros) == 0xFFFF
    assert ck.checksum(ones) == ck.rfc1071_reference(ones)
    # RFC 1071's fold gives 0 only for all-zero data; a non-zero sum ≡ 0 gives 0xFFFF.
    assert ck.ones_sum(zeros) == 0
    if length >= 2 and length % 2 == 0:
        assert ck.ones_sum(ones) == 0xFFFF
    assert ck.ones_sum(b"\x00\x01\xff\xfe" + zeros) == 0xFFFF


@settings(max_examples=100, deadline=None)
@given(a=st.binary(max_size=64).map(lambda b: b[: len(b) & ~1]), b=st.binary(max_size=64))
def test_combine_equals_sum_of_concatenation(a: bytes, b: bytes) -> None:
    assert ck.checksum(b, ck.ones_sum(a)) == ck.rfc1071_reference(a + b)


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=2, max_size=200).map(lambda b: b[: len(b) & ~1]),
    pos=st.integers(min_value=0),
    new=st.integers(min_value=0, max_value=0xFFFF),
)
def test_incremental_update_rfc1624(data: bytes, pos: int, new: int) -> None:
    i = (pos % (len(data) // 2)) * 2
    old = int.from_bytes(data[i : i + 2], "big")
    changed = data[:i] + new.to_bytes(2, "big") + data[i + 2 :]
    updated = ck.update_checksum(ck.checksum(data), old, new)
    # RFC 1624 may yield either zero of one's complement only for all-zero data.
    assert updated == ck.checksum(changed) or not any(changed)
