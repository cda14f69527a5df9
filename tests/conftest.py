from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ helpers (netns, tunbridge, scenario_runner) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def web() -> Iterator[Any]:
    """The "remote" web host of the proxy tests: reachable only as VIP 127.0.42.101
    through the (fake) stack, which maps it to 127.0.43.101."""
    from test_dialer import OriginServer

    with OriginServer("127.0.43.101", "web") as server:
        yield server


@pytest.fixture
def outside() -> Iterator[Any]:
    """A server outside the virtual network (reached through the OS)."""
    from test_dialer import OriginServer

    with OriginServer("127.0.0.1", "outside") as server:
        yield server
