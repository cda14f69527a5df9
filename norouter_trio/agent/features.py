"""Feature strings this agent build advertises in its configure result (behaviour.md §3).

Advertise only what works: the manager relies on these (it refuses a host without ``tcp``,
and refuses ``loopback.disable`` on an agent that lacks it).  Each data-plane part appends
its own strings here when it lands, in the order of the original's list.
"""

from __future__ import annotations

FEATURES: list[str] = [
    # Appended by the data-plane parts as they land, e.g. "loopback", "tcp", "http",
    # "loopback.disable", "socks", "hostaliases", 'hostaliases."nip.io"', "etchosts",
    # "routes", "dns".
    "loopback", "tcp", "loopback.disable",
    "http", "socks", "hostaliases", 'hostaliases."nip.io"', "etchosts", "routes", "dns",
]


def features() -> list[str]:
    """A copy of the advertised list (callers may not mutate the module's list)."""
    return list(FEATURES)
