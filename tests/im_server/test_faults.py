"""Faults under load: a node killed with SIGKILL, Redis restarted. No acked message is lost
or stored twice, and delivery resumes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import aiohttp
import pytest
from im_helpers import login, make_user

from im_server.client import Client, ImError
from im_server.localstack import Stack

PER_SENDER = 60


async def _pairs(stack: Stack, layout: list[tuple[int, int]]) -> list[tuple[Client, Client, int]]:
    """One (sender, receiver, conv) per (sender node, receiver node) in ``layout``."""
    urls = [s.url for s in stack.servers]
    pairs = []
    for s_node, r_node in layout:
        s_name, _ = await make_user(stack, urls[0])
        r_name, r_id = await make_user(stack, urls[0])
        others = [u for u in urls if u != urls[s_node]]
        sender = await login(urls[s_node], s_name, fallback_urls=others)
        others = [u for u in urls if u != urls[r_node]]
        receiver = await login(urls[r_node], r_name, fallback_urls=others)
        pairs.append((sender, receiver, await sender.direct(r_id)))
    return pairs


async def _run(pairs: list[tuple[Client, Client, int]], fault_after: int,
               fault: Callable[[], None]) -> None:
    acked: dict[int, dict[str, int]] = {conv: {} for _, _, conv in pairs}
    received: dict[int, list[int]] = {conv: [] for _, _, conv in pairs}
    total = 0
    faulted = asyncio.Event()

    async def send_all(sender: Client, conv: int) -> None:
        nonlocal total
        for i in range(PER_SENDER):
            ack = await sender.send(conv, {"i": i}, timeout=3, attempts=20)
            acked[conv][ack.cid] = ack.seq
            total += 1
            if total == fault_after:
                await asyncio.to_thread(fault)
                faulted.set()

    async def receive_all(receiver: Client, conv: int) -> None:
        async for msg in receiver.messages():
            received[conv].append(msg.seq)
            if len(received[conv]) == PER_SENDER:
                return

    receivers = [asyncio.create_task(receive_all(r, c)) for _, r, c in pairs]
    await asyncio.wait_for(asyncio.gather(*[send_all(s, c) for s, _, c in pairs]), 120)
    assert faulted.is_set()
    await asyncio.wait_for(asyncio.gather(*receivers), 60)
    for _, receiver, conv in pairs:
        # every send acked exactly once, seqs gapless, nothing stored twice
        assert sorted(acked[conv].values()) == list(range(1, PER_SENDER + 1))
        assert received[conv] == list(range(1, PER_SENDER + 1))  # once each, in order
        stored = await receiver.history(conv, limit=1000)
        assert [m.seq for m in stored] == list(range(1, PER_SENDER + 1))
        assert {m.cid: m.seq for m in stored} == acked[conv]
        assert sorted(m.body["i"] for m in stored) == list(range(PER_SENDER))
    for sender, receiver, _ in pairs:
        await sender.close()
        await receiver.close()


async def test_node_killed_mid_load(fresh_stack: Stack) -> None:
    victim = fresh_stack.add_server()
    fresh_stack.add_server()
    # senders and receivers on the victim and on the survivor, crossing both ways
    pairs = await _pairs(fresh_stack, [(0, 1), (0, 1), (1, 0), (0, 0), (1, 1)])
    await _run(pairs, fault_after=PER_SENDER, fault=lambda: victim.signal(signal.SIGKILL))
    assert victim.wait(10) == -signal.SIGKILL


async def test_redis_restarted_mid_load(fresh_stack: Stack) -> None:
    fresh_stack.add_server()
    fresh_stack.add_server()
    pairs = await _pairs(fresh_stack, [(0, 1), (1, 0), (0, 1), (1, 1)])
    redis = fresh_stack.redis
    assert redis is not None
    await _run(pairs, fault_after=PER_SENDER, fault=lambda: redis.restart(down_for=1.0))


async def test_postgres_lost_then_back(fresh_stack: Stack) -> None:
    node = fresh_stack.add_server()
    (a_name, _), (b_name, b_id) = [await make_user(fresh_stack, node.url) for _ in range(2)]
    a = await login(node.url, a_name)
    b = await login(node.url, b_name)
    conv = await a.direct(b_id)
    assert (await a.send(conv, "before")).seq == 1
    pg = fresh_stack.postgres
    assert pg is not None
    await asyncio.to_thread(pg.stop)
    try:
        with pytest.raises(ImError) as err:
            await a.send(conv, "during", cid="during-1", attempts=1)
        assert "unavailable" in str(err.value)
        async with aiohttp.ClientSession() as session, session.get(node.url + "/readyz") as r:
            assert r.status == 503
            assert any("postgresql" in p for p in (await r.json())["problems"])
        await b.ping()  # the node still answers on open sockets
    finally:
        await asyncio.to_thread(pg.start)
    ack = await a.send(conv, "during", cid="during-1", attempts=10)
    assert ack.seq == 2  # stored once, no gap left by the failed attempt
    assert [m.body for m in await b.history(conv)] == ["before", "during"]
    await a.close()
    await b.close()


async def test_presence_expires_when_a_node_dies(fresh_stack: Stack) -> None:
    watcher_node = fresh_stack.add_server(IM_PRESENCE_TTL_S="3")
    victim = fresh_stack.add_server(IM_PRESENCE_TTL_S="3")
    (w_name, _), (v_name, v_id) = [await make_user(fresh_stack, watcher_node.url)
                                   for _ in range(2)]
    watcher = await login(watcher_node.url, w_name)
    doomed = await login(victim.url, v_name, reconnect=False)  # its node dies under it
    # The victim's node registers the new device in Redis just after the login
    # answers; wait (bounded) until the watcher's node sees it.
    for _ in range(50):
        if await watcher.presence([v_id]) == {v_id: True}:
            break
        await asyncio.sleep(0.1)
    assert await watcher.presence([v_id]) == {v_id: True}
    victim.signal(signal.SIGKILL)

    async def offline() -> dict:
        while True:  # an "online" event of the login may still be on its way first
            event = await watcher.events.get()
            if event.get("online") is not True:
                return event

    event = await asyncio.wait_for(offline(), 15)
    assert event == {"type": "presence", "user": v_id, "online": False}
    assert await watcher.presence([v_id]) == {v_id: False}
    await watcher.close()
    await doomed.close()
