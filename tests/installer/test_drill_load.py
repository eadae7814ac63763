"""The drill's load generator and its figures against two real IM server processes on
loopback (throwaway PostgreSQL and Redis): one node is SIGKILLed under load."""

from __future__ import annotations

import asyncio
import math
import shutil
import signal
from collections.abc import Iterator

import pytest

from im_server.client import Client, ImError
from im_server.localstack import PG_BIN, REDIS_BIN, Stack
from installer.core.drill_load import Endpoint, Load, measure

# Cheap argon2: login speed is not what this checks.
FAST = {"IM_ARGON2_TIME_COST": "1", "IM_ARGON2_MEMORY_KIB": "1024", "IM_LOG_LEVEL": "WARNING"}


@pytest.fixture
def stack() -> Iterator[Stack]:
    if not (PG_BIN / "postgres").exists() or not shutil.which(REDIS_BIN):
        pytest.skip(f"needs PostgreSQL 15 in {PG_BIN} and {REDIS_BIN} (scripts/setup.sh)")
    with Stack(fsync=False, extra_env=FAST) as st:
        yield st


async def _drill(stack: Stack) -> tuple[Load, float, float]:
    first, second = stack.add_server(), stack.add_server()
    endpoint = Endpoint((first.url, second.url))
    async with Load(endpoint, stack.admin_token, "drilltest") as load:
        sender_node, receiver_node = await load.place("node1", "node1")
        assert (sender_node, receiver_node) == ("node1", "node2")
        stop = asyncio.Event()
        running = asyncio.create_task(load.run(20, stop))
        await asyncio.sleep(2)
        fault_at = load.now()
        first.signal(signal.SIGKILL)
        await asyncio.sleep(4)
        end = load.now()
        stop.set()
        await running
        await load.audit()
    for name in load.names:  # deleted at the end
        with pytest.raises(ImError):
            await Client.login(second.url, name, load.password)
    return load, fault_at, end


def test_load_through_a_node_kill_loses_nothing(stack: Stack) -> None:
    load, fault_at, end = asyncio.run(_drill(stack))
    timeline = load.timeline
    figures = measure(timeline, fault_at, end)
    assert figures.sent >= 80, figures
    assert figures.acked == figures.sent, figures
    assert figures.acked_lost == 0, figures
    assert figures.delivered == figures.acked, figures
    assert figures.undelivered == 0, figures
    assert figures.duplicates == 0, figures
    assert figures.reordered == 0, figures
    assert math.isfinite(figures.rto_s), figures
    assert figures.p99_before_ms is not None and figures.p99_fault_ms is not None
    # the sender left the killed node for the other one; the receiver stayed
    assert [(r.device, r.node) for r in timeline.reconnects] == [("sender", "node2")]
    after = [a for a in timeline.attempts if a.ok and a.sent > fault_at + 1]
    assert after and all(a.node == "node2" for a in after), after
