"""Reading the manager's per-host state and route table for the relay's messages.

The manager is authoritative for what it knows (VIP, state, counters, queue depth, routes);
the relay's own observer fills in what it saw (lifecycle details, its own counts) for hosts
or fields the manager does not expose. Read once per tick, never on the packet path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .observer import HostCounters, RelayObserver, host_name

_COUNTER_FIELDS = ("frames_in", "frames_out", "bytes_in", "bytes_out")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _manager_hosts(manager: Any) -> list[Any]:
    hosts = getattr(manager, "host_states", None) or getattr(manager, "hosts", None)
    if callable(hosts):
        hosts = hosts()
    if hosts is None:
        return []
    if isinstance(hosts, Mapping):
        return list(hosts.values())
    return list(hosts) if isinstance(hosts, Iterable) else []


def _counters(src: Any, own: HostCounters | None) -> dict[str, Any]:
    """The manager's counters for one host; drops the observer saw fill in if it has none."""
    out: dict[str, Any] = {name: 0 for name in _COUNTER_FIELDS}
    out["drops"] = dict(own.drops) if own is not None else {}
    out["queue_depth"] = None
    if src is None:
        return out
    for name in _COUNTER_FIELDS:
        value = _get(src, name)
        if isinstance(value, int):
            out[name] = value
    drops = _get(src, "drops")
    if isinstance(drops, Mapping) and drops:
        out["drops"] = {str(k): int(v) for k, v in drops.items()}
    depth = _get(src, "queue_depth")
    if callable(depth):
        depth = depth()
    if isinstance(depth, int):
        out["queue_depth"] = depth
    return out


def host_table(manager: Any, obs: RelayObserver) -> list[dict[str, Any]]:
    """Every host known to the manager or seen by the observer, manager order first."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for h in _manager_hosts(manager):
        name = host_name(h)
        seen.add(name)
        info = obs.hosts.get(name)
        row: dict[str, Any] = info.to_json() if info is not None else {"name": name}
        for key in ("vip", "argv", "state", "features", "version", "exit_code", "exit_reason",
                    "pid"):
            value = _get(h, key)
            if value is not None:
                row[key] = list(value) if isinstance(value, (list, tuple)) else value
        tail = _get(h, "last_stderr")
        if tail and not (info is not None and info.stderr):
            row["stderr"] = [str(line) for line in tail]
        counters_src = _get(h, "counters", h)
        if callable(counters_src):
            counters_src = counters_src()
        row["counters"] = _counters(counters_src, obs.counters.get(name))
        depth = _get(h, "queue_depth")
        if callable(depth):
            depth = depth()
        if isinstance(depth, int):
            row["counters"]["queue_depth"] = depth
        rows.append(row)
    for name in list(obs.hosts) + list(obs.counters) + list(obs.rings):
        if name in seen or not name:
            continue
        seen.add(name)
        info = obs.hosts.get(name)
        extra: dict[str, Any] = info.to_json() if info is not None else {"name": name}
        extra["counters"] = _counters(None, obs.counters.get(name))
        rows.append(extra)
    for row in rows:
        row.setdefault("vip", None)
        row.setdefault("state", "unknown")
    return rows


def route_table(manager: Any, obs: RelayObserver) -> list[dict[str, Any]]:
    """Learned routes (from routeSuggestion) and manifest CIDR routes, as the manager has them."""
    table = getattr(manager, "routing", None) or getattr(manager, "routes", None)
    rows: list[dict[str, Any]] = []
    learned = getattr(table, "learned", None)
    if callable(learned):
        rows += [{"to": ip, "via": via, "kind": "learned"} for ip, via in learned()]
    else:
        rows += [{"to": ip, "via": via, "kind": "learned"} for ip, via in obs.learned.items()]
    cidrs = getattr(table, "cidr_routes", None)
    if callable(cidrs):
        rows += [{"to": cidr, "via": via, "kind": "cidr"} for cidr, via in cidrs()]
    return rows


def backfill(manager: Any, obs: RelayObserver) -> None:
    """Replay what happened before the relay attached (agents may already be starting)."""
    for h in _manager_hosts(manager):
        argv = _get(h, "argv")
        state = _get(h, "state")
        if not argv and state in (None, "starting"):
            continue  # not started yet: its own agent_starting will come
        obs.agent_starting(h, list(argv or []))
        if state == "ready" or (state == "exited" and _get(h, "version") is not None):
            obs.agent_configured(h, list(_get(h, "features") or []), str(_get(h, "version")))
        if state == "exited":
            obs.agent_exited(h, _get(h, "exit_code"), list(_get(h, "last_stderr") or []))
