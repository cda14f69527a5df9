"""Loss recovery for the sans-IO connection: RTO, NewReno, SACK scoreboard.

- `RTOEstimator`: RFC 6298 (SRTT/RTTVAR, exponential backoff; Karn's rule is applied by
  the caller, which never samples a retransmitted segment).
- `NewReno`: congestion window per RFC 5681 (slow start, congestion avoidance, fast
  retransmit) with the NewReno partial-ACK rules of RFC 6582.
- `SackScoreboard`: what the peer reported with SACK (RFC 2018), so recovery retransmits
  the holes below the highest SACKed byte instead of one segment per round trip.
"""

from __future__ import annotations

from .seq import HALF, MASK

_CLOCK_GRANULARITY = 0.001  # G in RFC 6298 §2


class RTOEstimator:
    """Retransmission timeout per RFC 6298."""

    __slots__ = ("max_rto", "min_rto", "rto", "rttvar", "srtt")

    def __init__(self, initial: float, min_rto: float, max_rto: float) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = initial  # §2.1
        self.min_rto = min_rto
        self.max_rto = max_rto

    def sample(self, r: float) -> None:
        """Feed one RTT measurement of a segment sent exactly once (§2.2, §2.3)."""
        srtt = self.srtt
        if srtt is None:
            srtt = r
            rttvar = r / 2
        else:
            rttvar = 0.75 * self.rttvar + 0.25 * (srtt - r if srtt > r else r - srtt)
            srtt = 0.875 * srtt + 0.125 * r
        self.srtt = srtt
        self.rttvar = rttvar
        # Comparisons spelled out: this runs for most ACKs, and min()/max() calls cost more.
        k = 4 * rttvar
        rto = srtt + (k if k > _CLOCK_GRANULARITY else _CLOCK_GRANULARITY)
        if rto < self.min_rto:  # §2.4
            rto = self.min_rto
        if rto > self.max_rto:  # §2.5
            rto = self.max_rto
        self.rto = rto

    def backoff(self) -> None:
        """Double the RTO after a timeout (§5.5)."""
        self.rto = min(self.max_rto, self.rto * 2)


def initial_window(smss: int) -> int:
    """IW of RFC 5681 §3.1."""
    if smss > 2190:
        return 2 * smss
    if smss > 1095:
        return 3 * smss
    return 4 * smss


class NewReno:
    """Congestion window with fast retransmit/recovery (RFC 5681 §3, RFC 6582 §3.2)."""

    __slots__ = ("_acc", "cwnd", "dupacks", "in_recovery", "recover", "smss", "ssthresh")

    def __init__(self, smss: int, recover: int) -> None:
        self.smss = smss
        self.cwnd = initial_window(smss)
        self.ssthresh = 1 << 30  # "arbitrarily high" (RFC 5681 §3.1)
        self.in_recovery = False
        self.recover = recover  # RFC 6582 §3.2 step 1: ISS (one past: SND.MAX convention)
        self.dupacks = 0
        self._acc = 0

    def set_smss(self, smss: int) -> None:
        self.smss = smss
        self.cwnd = initial_window(smss)

    def on_new_ack(self, ack: int, acked: int, flight_after: int) -> bool:
        """A cumulative ACK advanced SND.UNA by `acked` bytes.

        Returns True for a partial ACK during recovery: the caller retransmits the first
        unacknowledged segment (RFC 6582 §3.2 step 5).
        """
        smss = self.smss
        self.dupacks = 0
        if self.in_recovery:
            if ((ack - self.recover + HALF) & MASK) - HALF > 0 or ack == self.recover:
                # Full acknowledgment: deflate (RFC 6582 §3.2 step 4, option 1).
                self.in_recovery = False
                self.cwnd = min(self.ssthresh, max(flight_after, smss) + smss)
                return False
            # Partial: deflate by the amount acked, add back one SMSS.
            self.cwnd = max(smss, self.cwnd - acked + smss)
            return True
        if self.cwnd < self.ssthresh:
            # Slow start with appropriate byte counting, L = 2*SMSS (RFC 3465 §2.2),
            # so delayed ACKs do not halve the growth rate.
            self.cwnd += min(acked, 2 * smss)
        else:
            # Congestion avoidance: one SMSS per cwnd acknowledged (RFC 5681 §3.1).
            self._acc += acked
            if self._acc >= self.cwnd:
                self._acc -= self.cwnd
                self.cwnd += smss
        return False

    def on_dupack(
        self, snd_una: int, snd_max: int, flight: int, sack_lost: bool = False, thresh: int = 3
    ) -> bool:
        """A duplicate ACK; True means "enter recovery and fast-retransmit" (RFC 5681 §3.2).

        `thresh` is the duplicate-ACK threshold: 3, or lower for early retransmit.
        """
        self.dupacks += 1
        if self.in_recovery:
            self.cwnd += self.smss  # inflation (step 3 of §3.2 / RFC 6582 step 3)
            return False
        # RFC 6582 §3.2 step 2: only if the ACK covers more than `recover`, so one
        # loss event after a timeout does not cause repeated reductions. (Our `recover`
        # is one past the highest sequence number sent, hence ">=".)
        if (self.dupacks >= thresh or sack_lost) and (
            ((snd_una - self.recover + HALF) & MASK) - HALF >= 0
        ):
            self.enter_recovery(snd_max, flight)
            return True
        return False

    def enter_recovery(self, snd_max: int, flight: int) -> None:
        smss = self.smss
        self.ssthresh = max(flight // 2, 2 * smss)  # RFC 5681 eq. (4)
        self.cwnd = self.ssthresh + 3 * smss
        self.recover = snd_max
        self.in_recovery = True

    def on_timeout(self, snd_max: int, flight: int) -> None:
        """RTO expiry: loss window of one segment (RFC 5681 §3.1, RFC 6582 §3.2 step 1)."""
        self.ssthresh = max(flight // 2, 2 * self.smss)
        self.cwnd = self.smss
        self.in_recovery = False
        self.recover = snd_max
        self.dupacks = 0
        self._acc = 0


class SackScoreboard:
    """Sorted, merged `[start, end)` ranges the peer SACKed above SND.UNA (RFC 2018 §4)."""

    __slots__ = ("ranges",)

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []

    def clear(self) -> None:
        self.ranges.clear()

    def add(self, blocks: tuple[tuple[int, int], ...], una: int, snd_max: int) -> bool:
        """Merge reported blocks; returns True if anything new was learned."""
        limit = (snd_max - una) & MASK
        new = False
        ranges = self.ranges
        for start, end in blocks:
            a = (start - una) & MASK
            b = (end - una) & MASK
            if a >= b or b > limit or a == 0:  # bogus, stale or a D-SACK below SND.UNA
                continue
            # Relative offsets keep comparisons simple across the 2**32 wrap.
            rel = [((x - una) & MASK, (y - una) & MASK) for x, y in ranges]
            if any(x <= a and y >= b for x, y in rel):
                continue
            new = True
            merged: list[tuple[int, int]] = []
            placed = False
            for x, y in rel:
                if y < a:
                    merged.append((x, y))
                elif x > b:
                    if not placed:
                        merged.append((a, b))
                        placed = True
                    merged.append((x, y))
                else:
                    a = min(a, x)
                    b = max(b, y)
            if not placed:
                merged.append((a, b))
            ranges[:] = [[(una + x) & MASK, (una + y) & MASK] for x, y in merged]
        return new

    def prune(self, una: int) -> None:
        """Forget what the cumulative ACK now covers."""
        ranges = self.ranges
        while ranges:
            first = ranges[0]
            if ((first[1] - una + HALF) & MASK) - HALF <= 0:
                del ranges[0]
            elif ((first[0] - una + HALF) & MASK) - HALF < 0:
                first[0] = una
                break
            else:
                break

    def sacked_bytes(self) -> int:
        return sum((b - a) & MASK for a, b in self.ranges)

    def next_hole(self, start: int, una: int) -> tuple[int, int] | None:
        """First un-SACKed range at or after `start` that lies below a SACKed range.

        Data above the highest SACK is not presumed lost (RFC 6675 §4 spirit).
        """
        s = (start - una) & MASK
        if s >= HALF:
            s = 0
        for a, b in self.ranges:
            x = (a - una) & MASK
            y = (b - una) & MASK
            if y <= s:
                continue
            if x <= s:
                s = y
                continue
            return (una + s) & MASK, a
        return None
