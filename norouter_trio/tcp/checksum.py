"""Internet checksum (RFC 1071), fast in pure Python.

The one's-complement sum of 16-bit words is the buffer's value modulo 0xFFFF, because
2**16 ≡ 1 (mod 0xFFFF). So a buffer is read as one big integer (`int.from_bytes`, which is
C-speed) and reduced. Reducing a huge integer with `%` walks its 30-bit digits with one
hardware division each, so it is first *folded*: for k a multiple of 16,
n = hi·2**k + lo ≡ hi + lo, and shifts/masks/adds on big integers are much cheaper than
division. k runs over powers of two so the few masks are built once. Little-endian reading
is a little faster than big-endian; RFC 1071 §2(B) makes the sum byte-order independent,
so the result is byte-swapped back at the end.

Measured per 64 KiB on the loaded 2-core box (relative figures matter; see
bench/stack_bench.py): `int.from_bytes % 0xFFFF` ~1.3x the folded time, folded (used)
1x, `memoryview.cast('Q')` summing ~3x, `array('H')` ~6x, numpy ~0.1x. numpy is used as an
optional accelerator for buffers >= NUMPY_THRESHOLD when importable (imported lazily on
first use, never required; `set_numpy(False)` turns it off). Splitting the buffer into
chunks before `int.from_bytes` gained nothing measurable. `update_checksum` (RFC 1624) is
for changing one header word without re-summing a payload.

The one's-complement sum has two zeros; RFC 1071's end-around-carry fold only yields 0 for
an all-zero buffer and 0xFFFF otherwise. `ones_sum` reproduces that exactly.
"""

from __future__ import annotations

from typing import Any

# Buffers at least this long go to numpy when available (its call overhead is ~2 µs).
NUMPY_THRESHOLD = 2048

_np: Any = None
_np_state = 0  # 0: not tried yet, 1: available, -1: unavailable or disabled


def set_numpy(enabled: bool) -> None:
    """Allow (default) or forbid the numpy accelerator; for benchmarks and tests."""
    global _np_state
    _np_state = 0 if enabled else -1


def warm_up() -> bool:
    """Import the numpy accelerator now (if allowed and installed) rather than on the
    first big packet; returns whether it is in use. The stack calls this at start."""
    return _numpy() is not None


def _numpy() -> Any:
    global _np, _np_state
    if _np_state == 0:
        try:
            import numpy
        except ImportError:
            _np_state = -1
            return None
        _np = numpy
        _np_state = 1
    return _np if _np_state == 1 else None


# Masks for folding at k = 256, 512, ... bits (k a power of two, so the handful of masks
# can be built once: ~64 KiB of integers for buffers up to 128 KiB).
_MASKS = {1 << i: (1 << (1 << i)) - 1 for i in range(8, 21)}


def _fold_sum(data: bytes | bytearray | memoryview) -> int:
    """Pure-Python one's-complement sum (RFC 1071 result, 0..0xFFFF)."""
    n = int.from_bytes(data, "little")
    if not n:
        return 0
    bits = len(data) * 8
    if bits > 512:  # headers go straight to %: folding only pays on big buffers
        k = 256
        while 2 * k < bits:
            k <<= 1
        while k >= 256:  # invariant: n < 2**(2k); each fold halves the size
            mask = _MASKS.get(k)
            if mask is None:
                mask = (1 << k) - 1
            n = (n >> k) + (n & mask)
            k >>= 1
    r = n % 0xFFFF
    if r == 0:
        return 0xFFFF  # non-zero data whose sum is ≡ 0: RFC 1071 yields 0xFFFF
    return ((r >> 8) | (r << 8)) & 0xFFFF


def _numpy_sum(np: Any, data: bytes | bytearray | memoryview) -> int:
    length = len(data)
    even = length & ~1
    s = int(np.frombuffer(data, dtype=">u2", count=even >> 1).sum(dtype=np.uint64))
    if length & 1:
        s += data[even] << 8
    if not s:
        return 0
    r = s % 0xFFFF
    return r if r else 0xFFFF


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's-complement sum of `data` as big-endian 16-bit words (odd tail zero-padded).

    Equal to RFC 1071's folded 32-bit accumulator: 0 only when every byte is 0.
    """
    if len(data) >= NUMPY_THRESHOLD and _np_state >= 0:
        np = _numpy()
        if np is not None:
            return _numpy_sum(np, data)
    return _fold_sum(data)


def combine(a: int, b: int) -> int:
    """One's-complement sum of two partial sums (each of an even-length, even-aligned part)."""
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of `data` (the value to put in a header field).

    `initial` is a partial `ones_sum` (e.g. of a pseudo-header) to include.
    """
    return ~combine(initial, ones_sum(data)) & 0xFFFF


def update_checksum(old_checksum: int, old_word: int, new_word: int) -> int:
    """Update a checksum after one 16-bit field changed from `old_word` to `new_word`.

    RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'); avoids re-summing a payload when only a header
    field (ports, ACK number, window) changes.
    """
    s = combine(combine(~old_checksum & 0xFFFF, ~old_word & 0xFFFF), new_word & 0xFFFF)
    return ~s & 0xFFFF


def rfc1071_reference(data: bytes | bytearray | memoryview) -> int:
    """The straightforward RFC 1071 §4.1 loop; slow, kept as the oracle for tests."""
    total = 0
    b = bytes(data)
    for i in range(0, len(b) - 1, 2):
        total += (b[i] << 8) | b[i + 1]
    if len(b) & 1:
        total += b[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
