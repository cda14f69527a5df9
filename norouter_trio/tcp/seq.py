"""Sequence-number arithmetic modulo 2**32 (RFC 9293 §3.4, RFC 1982 serial numbers).

Sequence numbers wrap, so "a before b" means the signed 32-bit difference is negative.
The connection inlines these expressions on its hot path; this module is the reference
and what tests and the recovery code use.
"""

from __future__ import annotations

MOD = 1 << 32
MASK = MOD - 1
HALF = 1 << 31


def seq_add(a: int, n: int) -> int:
    """`a + n` modulo 2**32."""
    return (a + n) & MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance `a - b` in (-2**31, 2**31]; positive when `a` is after `b`."""
    return ((a - b + HALF) & MASK) - HALF


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_diff(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    return seq_diff(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    return seq_diff(a, b) >= 0


def seq_in_window(x: int, start: int, size: int) -> bool:
    """True when `start <= x < start + size` (modulo 2**32)."""
    return ((x - start) & MASK) < size


def seq_max(a: int, b: int) -> int:
    return a if seq_diff(a, b) >= 0 else b
