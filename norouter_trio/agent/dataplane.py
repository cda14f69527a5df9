"""Agent data plane (stub until the data-plane work lands): drains inbound packets."""

from __future__ import annotations

from typing import Any

import trio

from norouter_trio.messages import ConfigureArgs


async def run_dataplane(args: ConfigureArgs, link: Any,
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    async for _packet in link.inbound:
        pass
