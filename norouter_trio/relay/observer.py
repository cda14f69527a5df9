"""The relay's manager observer: turns switch and lifecycle callbacks into relay state.

`frame_switched` runs on the switch's hot path for every frame: it does O(1) work (a ring
append, a flow-table update, a rate-limit check) and never awaits or blocks. The
websocket side reads this state from its own tasks (one tick per second) so that the switch
never waits for a browser.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .flows import FlowTable, PacketLog, describe
from .pcap import PacketRing


def host_name(host: object) -> str:
    """The manager may hand us a name or a host object with `.name`."""
    if type(host) is str:
        return host
    name = getattr(host, "name", None)
    return name if isinstance(name, str) else str(host)


@dataclass(slots=True)
class HostCounters:
    """Drops the observer saw, by reason. Frame and byte counters come from the manager
    (it counts them anyway), which keeps `frame_switched` cheaper."""

    drops: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class HostInfo:
    """Lifecycle facts about one agent, as the observer learned them."""

    name: str
    argv: list[str] = field(default_factory=list)
    state: str = "unknown"
    features: list[str] = field(default_factory=list)
    version: str | None = None
    exit_code: int | None = None
    stderr: list[str] = field(default_factory=list)
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": list(self.argv),
            "state": self.state,
            "features": list(self.features),
            "version": self.version,
            "exit_code": self.exit_code,
            "stderr": list(self.stderr) or list(self.stderr_tail),
            "warnings": list(self.warnings),
        }


class RelayObserver:
    """Implements the `manager.Observer` callbacks for the relay."""

    def __init__(
        self,
        *,
        flow_limit: int = 256,
        snaplen: int = 256,
        ring_packets: int = 2000,
        ring_bytes: int = 1 << 20,
        log_rate: float = 100.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.snaplen = snaplen
        self.ring_packets = ring_packets
        self.ring_bytes = ring_bytes
        self.flows = FlowTable(flow_limit)
        self.log = PacketLog(rate=log_rate)
        self._flow_update = self.flows.update  # bound once: frame_switched runs per frame
        self._log_admit = self.log.admit
        self.rings: dict[str, PacketRing] = {}
        self._fast: dict[object, tuple[str, PacketRing]] = {}
        self.counters: dict[str, HostCounters] = {}
        self.hosts: dict[str, HostInfo] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.learned: OrderedDict[str, str] = OrderedDict()
        # Set by the relay: called with each lifecycle / route message (never blocks).
        self.publish: Callable[[dict[str, Any]], None] = lambda msg: None

    # -- helpers -------------------------------------------------------------------------

    def _host(self, name: str) -> HostInfo:
        info = self.hosts.get(name)
        if info is None:
            info = self.hosts[name] = HostInfo(name)
        return info

    def _count(self, name: str) -> HostCounters:
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = HostCounters()
        return c

    def _ring(self, name: str) -> PacketRing:
        ring = self.rings.get(name)
        if ring is None:
            ring = self.rings[name] = PacketRing(
                min(self.ring_packets, max(16, self.ring_bytes // max(1, self.snaplen))))
        return ring

    def _event(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        self.publish(msg)

    # -- lifecycle (rare) ----------------------------------------------------------------

    def agent_starting(self, host: object, argv: Sequence[str]) -> None:
        info = self._host(host_name(host))
        info.argv = [str(a) for a in argv]
        info.state = "starting"
        info.exit_code = None
        info.stderr = []
        self._event(
            {"type": "agent", "event": "starting", "host": info.name, "t": self.clock(),
             "argv": info.argv}
        )

    def agent_configured(self, host: object, features: Sequence[str], version: str) -> None:
        info = self._host(host_name(host))
        info.features = [str(f) for f in features]
        info.version = str(version)
        info.state = "ready"
        self._event(
            {"type": "agent", "event": "configured", "host": info.name, "t": self.clock(),
             "features": info.features, "version": info.version}
        )

    def agent_warning(self, host: object, msg: str) -> None:
        info = self._host(host_name(host))
        info.warnings.append(str(msg))
        self._event(
            {"type": "agent", "event": "warning", "host": info.name, "t": self.clock(),
             "message": str(msg)}
        )

    def agent_stderr(self, host: object, line: str) -> None:
        """Kept as a tail per host (shown on the page), not streamed line by line."""
        self._host(host_name(host)).stderr_tail.append(str(line))

    def agent_exited(
        self, host: object, code: int | None, last_stderr_lines: Sequence[str]
    ) -> None:
        info = self._host(host_name(host))
        info.state = "exited"
        info.exit_code = code
        info.stderr = [str(line) for line in last_stderr_lines][-20:]
        self._event(
            {"type": "agent", "event": "exited", "host": info.name, "t": self.clock(),
             "code": code, "stderr": info.stderr}
        )

    def route_learned(self, ips: Sequence[str], via: str) -> None:
        via_s = str(via)
        for ip in ips:
            self.learned[str(ip)] = via_s
            self.learned.move_to_end(str(ip))
        while len(self.learned) > 512:
            self.learned.popitem(last=False)
        self._event({"type": "routeSuggestion", "t": self.clock(), "ip": [str(i) for i in ips],
                     "route": via_s})

    # -- packet path (hot) ---------------------------------------------------------------

    def frame_switched(self, src_host: object, dst_host: object, packet: bytes) -> None:
        now = self.clock()
        fast = self._fast
        src_entry = fast.get(src_host) or self._fast_entry(src_host)
        dst_entry = fast.get(dst_host) or self._fast_entry(dst_host)
        src = src_entry[0]
        dst = dst_entry[0]
        n = len(packet)
        src_entry[1].append((now, src, dst, n, packet[: self.snaplen]))
        flags = 0
        if n >= 40 and packet[9] == 6:
            ihl = (packet[0] & 0x0F) << 2
            if n >= ihl + 20:
                flags = packet[ihl + 13]
                self._flow_update(
                    now, src, dst, packet, ihl, flags, n - ihl - ((packet[ihl + 12] >> 4) << 2)
                )
        if self._log_admit(now, flags & 0x07 != 0):  # SYN, FIN or RST
            self.log.add(describe(now, src, dst, packet))

    def _fast_entry(self, host: object) -> tuple[str, PacketRing]:
        """First frame of a host: remember its name and ring under the manager's key."""
        name = host_name(host)
        entry = (name, self._ring(name))
        self._fast[host] = entry
        return entry

    def frame_dropped(self, src_host: object, reason: str, packet: bytes) -> None:
        now = self.clock()
        src = host_name(src_host)
        drops = self._count(src).drops
        drops[reason] = drops.get(reason, 0) + 1
        if self.log.admit(now, True):
            self.log.add(describe(now, src, "", packet, drop=str(reason)))
