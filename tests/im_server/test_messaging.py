"""Send/ack, dedup, gapless seq, sync, multi-device, conversations, positions."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import ClientSession, WSMsgType
from im_helpers import login, make_user

from im_server.client import Client, ImError
from im_server.localstack import ServerProcess, Stack


async def _pair(stack: Stack, url: str) -> tuple[Client, Client, int]:
    a_name, _ = await make_user(stack, url)
    b_name, b_id = await make_user(stack, url)
    a = await login(url, a_name)
    b = await login(url, b_name)
    conv = await a.direct(b_id)
    return a, b, conv


async def test_send_ack_and_delivery(stack: Stack, server: ServerProcess) -> None:
    a, b, conv = await _pair(stack, server.url)
    try:
        acks = [await a.send(conv, {"text": f"m{i}"}) for i in range(5)]
        assert [x.seq for x in acks] == [1, 2, 3, 4, 5]
        got = [await b.next_message() for _ in range(5)]
        assert [m.seq for m in got] == [1, 2, 3, 4, 5]
        assert [m.body["text"] for m in got] == [f"m{i}" for i in range(5)]
        assert {m.sender for m in got} == {a.user_id}
        assert await b.direct(a.user_id) == conv  # one direct conversation per pair
    finally:
        await a.close()
        await b.close()


async def test_retry_with_same_cid_gets_same_seq(stack: Stack, server: ServerProcess) -> None:
    a, b, conv = await _pair(stack, server.url)
    try:
        first = await a.send(conv, "hello", cid="fixed-1")
        again = await a.send(conv, "hello", cid="fixed-1")
        assert again.seq == first.seq
        nxt = await a.send(conv, "next")
        assert nxt.seq == first.seq + 1  # gapless: the retry used no seq
        history = await b.history(conv)
        assert [m.seq for m in history] == [1, 2]
        assert [m.cid for m in history].count("fixed-1") == 1
    finally:
        await a.close()
        await b.close()


async def test_concurrent_senders_gapless(stack: Stack, server: ServerProcess,
                                          server2: ServerProcess) -> None:
    """Members on two nodes send at once into one group: seqs 1..N without gaps or repeats."""
    names = [await make_user(stack, server.url) for _ in range(3)]
    clients = [await login((server.url, server2.url)[i % 2], n) for i, (n, _) in enumerate(names)]
    try:
        conv = await clients[0].create_group("busy", [uid for _, uid in names])
        acks = await asyncio.gather(*[
            c.send(conv, {"n": i}) for c in clients for i in range(40)
        ])
        assert sorted(a.seq for a in acks) == list(range(1, 121))
        rows = await clients[1].history(conv, limit=1000)
        assert [m.seq for m in rows] == list(range(1, 121))
    finally:
        for c in clients:
            await c.close()


async def test_message_crosses_nodes(stack: Stack, server: ServerProcess,
                                     server2: ServerProcess) -> None:
    a_name, _ = await make_user(stack, server.url)
    b_name, b_id = await make_user(stack, server.url)
    a = await login(server.url, a_name)
    b = await login(server2.url, b_name)
    try:
        assert a.node != b.node
        conv = await a.direct(b_id)
        ack = await a.send(conv, {"text": "across"})
        msg = await b.next_message()
        assert (msg.conv, msg.seq, msg.body) == (conv, ack.seq, {"text": "across"})
    finally:
        await a.close()
        await b.close()


async def test_offline_sync_and_multi_device(stack: Stack, server: ServerProcess,
                                             server2: ServerProcess) -> None:
    a_name, _ = await make_user(stack, server.url)
    b_name, b_id = await make_user(stack, server.url)
    a = await login(server.url, a_name)
    conv = await a.direct(b_id)
    try:
        for i in range(3):
            await a.send(conv, i)  # b is offline
        b1 = await login(server.url, b_name)
        b2 = await login(server2.url, b_name)  # second device, other node
        assert b1.device_id != b2.device_id
        for dev in (b1, b2):
            assert [(await dev.next_message()).body for _ in range(3)] == [0, 1, 2]
        await a.send(conv, "live")
        for dev in (b1, b2):
            assert (await dev.next_message()).body == "live"
        # A's other device sees A's own message too; the sending device does not.
        a2 = await login(server2.url, a_name)
        bodies = [(await a2.next_message()).body for _ in range(4)]
        assert bodies == [0, 1, 2, "live"]
        await b1.send(conv, "from b1")
        assert (await b2.next_message()).body == "from b1"
        assert (await a.next_message()).body == "from b1"
        # stored received position: a new connection of b1's device skips what it has
        await b1.mark_received()
        await asyncio.sleep(0.3)
        again = Client(server.url, b1.access_token)
        await again.connect()
        await a.send(conv, "after")
        assert (await again.next_message()).body == "after"
        for c in (b1, b2, a2, again):
            await c.close()
    finally:
        await a.close()


async def test_groups(stack: Stack, server: ServerProcess) -> None:
    (o_name, _), (p_name, p_id), (q_name, q_id) = [await make_user(stack, server.url)
                                                   for _ in range(3)]
    owner, p, q = [await login(server.url, n) for n in (o_name, p_name, q_name)]
    try:
        conv = await owner.create_group("team", [p_id])
        assert (await p.events.get())["event"] == "created"
        await owner.rename(conv, "team 2")
        assert (await p.events.get())["title"] == "team 2"
        with pytest.raises(ImError) as err:
            await q.history(conv)
        assert err.value.status == 403
        with pytest.raises(ImError) as err:
            await q.send(conv, "intruder")
        assert err.value.code == "not_member"
        assert sorted(await owner.add_members(conv, [q_id])) == sorted(
            [owner.user_id, p_id, q_id])
        await owner.send(conv, "hi all")
        assert (await q.next_message()).body == "hi all"
        await p.leave(conv)
        assert await owner.remove_member(conv, q_id) == [owner.user_id]
        with pytest.raises(ImError):
            await p.send(conv, "gone")
        mine = {c["id"]: c for c in await owner.conversations()}
        assert mine[conv]["title"] == "team 2" and mine[conv]["members"] == [owner.user_id]
        assert conv not in {c["id"] for c in await p.conversations()}
    finally:
        for c in (owner, p, q):
            await c.close()


async def test_read_receipts_typing_presence(stack: Stack, server: ServerProcess,
                                             server2: ServerProcess) -> None:
    a, b, conv = await _pair(stack, server.url)
    try:
        ack = await a.send(conv, "read me")
        await b.next_message()
        await b.read(conv, ack.seq)
        event = await asyncio.wait_for(a.events.get(), 5)
        assert event == {"type": "read", "conv": conv, "user": b.user_id, "seq": ack.seq}
        await b.typing(conv)
        event = await asyncio.wait_for(a.events.get(), 5)
        assert event == {"type": "typing", "conv": conv, "user": b.user_id}
        assert await a.presence([b.user_id]) == {b.user_id: True}
        await b.close()
        event = await asyncio.wait_for(a.events.get(), 5)
        assert event == {"type": "presence", "user": b.user_id, "online": False}
        assert await a.presence([b.user_id]) == {b.user_id: False}
    finally:
        await a.close()
        await b.close()


async def test_bad_input_gets_error_frames(stack: Stack, server: ServerProcess) -> None:
    a, b, conv = await _pair(stack, server.url)
    async with ClientSession() as session:
        ws = await session.ws_connect(server.url + "/ws",
                                      headers={"Authorization": f"Bearer {a.access_token}"})
        assert orjson.loads((await ws.receive()).data)["type"] == "hello"

        async def reply(raw: str) -> dict:
            await ws.send_str(raw)
            return orjson.loads((await ws.receive(timeout=5)).data)

        assert (await reply("{not json"))["code"] == "bad_json"
        assert (await reply('{"type": "dance"}'))["code"] == "unknown_type"
        assert (await reply("[1]"))["code"] == "bad_frame"
        bad = await reply('{"type": "send", "conv": "x", "cid": "c1", "body": 1}')
        assert bad["code"] == "bad_frame"
        other_name, _ = await make_user(stack, server.url)
        other = await login(server.url, other_name)
        other_conv = await other.direct(b.user_id)
        denied = await reply(orjson.dumps(
            {"type": "send", "conv": other_conv, "cid": "c2", "body": "x"}).decode())
        assert (denied["code"], denied["ref"]) == ("not_member", "c2")
        ok = await reply(orjson.dumps({"type": "send", "conv": conv, "cid": "c3",
                                       "body": "still served"}).decode())
        assert ok["type"] == "ack"
        await ws.send_str('{"type": "send", "conv": 1, "cid": "big", "body": "%s"}'
                          % ("x" * 70000))
        closed = await ws.receive(timeout=5)
        assert closed.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        assert ws.close_code == 1009
        await other.close()
    # the connection that misbehaved is gone; the others still work
    assert (await a.send(conv, "after")).seq == 2
    await a.close()
    await b.close()


async def test_same_cid_twice_at_once_is_stored_once(stack: Stack, server: ServerProcess) -> None:
    """Both copies usually land in one commit batch: one row, two acks with one seq."""
    a, b, conv = await _pair(stack, server.url)
    async with ClientSession() as session:
        ws = await session.ws_connect(server.url + "/ws",
                                      headers={"Authorization": f"Bearer {a.access_token}"})
        await ws.receive()  # hello
        frame = orjson.dumps({"type": "send", "conv": conv, "cid": "twin", "body": "x"})
        for _ in range(3):
            await ws.send_bytes(frame)
        acks = [orjson.loads((await ws.receive(timeout=5)).data) for _ in range(3)]
        await ws.close()
    assert {(x["type"], x["seq"]) for x in acks} == {("ack", 1)}
    assert [m.cid for m in await b.history(conv)] == ["twin"]
    await a.close()
    await b.close()
