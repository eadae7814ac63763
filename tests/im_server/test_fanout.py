"""Per-node fan-out channels: who gets a publish, and no live message missed by a socket
that connects (or a node that joins) while messages are in flight."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from im_helpers import login, make_user

from im_server.client import Client
from im_server.localstack import Stack


async def _fanout_payloads(stack: Stack, seconds: float) -> list[tuple[str, bytes]]:
    """Every (channel, payload) published on ``im:fanout:*`` for ``seconds``, but the
    health probes each node publishes on its own channel."""
    r = aioredis.from_url(stack.redis_url)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe("im:fanout*")
    got: list[tuple[str, bytes]] = []
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            msg = await pubsub.get_message(timeout=left)
            if msg and msg["type"] == "pmessage" and b"\n!probe\t" not in msg["data"]:
                got.append((msg["channel"].decode(), msg["data"]))
    finally:
        await pubsub.aclose()
        await r.aclose()
    return got


async def test_publish_goes_only_to_other_nodes(fresh_stack: Stack) -> None:
    node1 = fresh_stack.add_server()
    a_name, _ = await make_user(fresh_stack, node1.url)
    b_name, b_id = await make_user(fresh_stack, node1.url)
    a = await login(node1.url, a_name)
    b = await login(node1.url, b_name)
    try:
        conv = await a.direct(b_id)
        # a node alone publishes nothing: its own sockets got the message directly
        listen = asyncio.create_task(_fanout_payloads(fresh_stack, 1.0))
        await asyncio.sleep(0.2)
        await a.send(conv, "alone")
        assert (await b.next_message()).body == "alone"
        assert await listen == []

        await asyncio.to_thread(fresh_stack.add_server)
        listen = asyncio.create_task(_fanout_payloads(fresh_stack, 1.0))
        await asyncio.sleep(0.2)
        await a.send(conv, "two nodes")
        assert (await b.next_message()).body == "two nodes"
        # exactly one publish, on the other node's channel (nothing read back by node1)
        got = await listen
        assert [ch for ch, _ in got] == ["im:fanout:node2"]
        assert got[0][1].startswith(b"node1\n")
    finally:
        await a.close()
        await b.close()


async def test_a_bad_payload_does_not_stop_fan_out(fresh_stack: Stack) -> None:
    node1 = fresh_stack.add_server()
    node2 = await asyncio.to_thread(fresh_stack.add_server)
    a_name, _ = await make_user(fresh_stack, node1.url)
    b_name, b_id = await make_user(fresh_stack, node1.url)
    a = await login(node1.url, a_name)
    b = await login(node2.url, b_name)
    r = aioredis.from_url(fresh_stack.redis_url)
    try:
        conv = await a.direct(b_id)
        # no tab-separated fields, and a user list that is not numbers
        for junk in (b"node9\nno fields here", b"node9\nx,y\t0\t{}"):
            assert await r.publish("im:fanout:node2", junk) == 1
        await a.send(conv, "still live")
        assert (await asyncio.wait_for(b.next_message(), 5)).body == "still live"
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(node2.url + "/metrics", timeout=5).read().decode())
        assert 'im_errors_total{kind="fanout_payload"} 2.0' in metrics
    finally:
        await r.aclose()
        await a.close()
        await b.close()


async def _raw_socket(url: str, token: str, session: aiohttp.ClientSession,
                      seen: list[int], stop: asyncio.Event) -> None:
    """One connection as a client does it: sync from 0 right after connecting, then live
    frames, never a second sync. Records every seq it is given."""
    async with session.ws_connect(url.replace("http", "ws", 1) + "/ws",
                                  headers={"Authorization": f"Bearer {token}"}) as ws:
        hello = orjson.loads((await ws.receive(timeout=10)).data)
        assert hello["type"] == "hello"
        await ws.send_bytes(orjson.dumps({"type": "sync", "positions": {}, "ref": "s"}))
        while not stop.is_set():
            try:
                msg = await ws.receive(timeout=0.1)
            except TimeoutError:
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frame: dict[str, Any] = orjson.loads(msg.data)
            assert frame["type"] != "resync"
            if frame["type"] == "msg":
                seen.append(frame["seq"])


async def test_socket_connecting_mid_stream_misses_nothing(fresh_stack: Stack) -> None:
    """A sender on node1 streams; node2 starts meanwhile and the receiver connects to it
    over and over. Each connection's sync plus its live frames hold every message from
    seq 1 to the last one acked before it closed."""
    node1 = fresh_stack.add_server()
    a_name, _ = await make_user(fresh_stack, node1.url)
    b_name, b_id = await make_user(fresh_stack, node1.url)
    a = await login(node1.url, a_name)
    b = await Client.login(node1.url, b_name, "password123")
    conv = await a.direct(b_id)
    acked = 0
    done = asyncio.Event()

    async def sender() -> None:
        nonlocal acked
        i = 0
        while not done.is_set():
            acked = (await a.send(conv, {"i": i})).seq
            i += 1
            await asyncio.sleep(0.002)

    joined = threading.Event()
    send_task = asyncio.create_task(sender())
    join = asyncio.create_task(asyncio.to_thread(lambda: (fresh_stack.add_server(),
                                                          joined.set())))
    results: list[tuple[list[int], int]] = []
    try:
        async with aiohttp.ClientSession() as session:
            while not joined.is_set():
                await asyncio.sleep(0.01)
            node2 = fresh_stack.servers[1]
            for _ in range(8):
                seen: list[int] = []
                stop = asyncio.Event()
                task = asyncio.create_task(_raw_socket(node2.url, b.access_token, session,
                                                       seen, stop))
                await asyncio.sleep(0.15)
                floor = acked  # acked before we stop: this connection must hold it
                await asyncio.sleep(0.05)
                stop.set()
                await task
                results.append((seen, floor))
        done.set()
        await join
        await send_task
    finally:
        send_task.cancel()
        await a.close()
        await b.close()
    for seen, floor in results:
        # a live frame may overtake the sync answer (clients drop the second copy by seq),
        # but nothing is missing between seq 1 and the last seq seen
        assert floor > 0
        assert set(seen) == set(range(1, max(seen) + 1))
        assert max(seen) >= floor
