"""Failover of the stores under a running cloud: Redis through Sentinel (the master frozen or
killed while a replica is promoted) and PostgreSQL through a multi-host DSN (a standby
promoted). Live fan-out comes back on its own, nothing acked is lost, no restart."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from im_helpers import FAST, login, make_user, require_binaries

from im_server.client import Client, ImError
from im_server.localstack import Postgres, RedisHA, ServerProcess, Stack, free_port

SEND_EVERY = 0.1
MAX_SENDS = 600  # per sender: a bound on the whole test, never reached when things work


@pytest.fixture
def redis_ha() -> Iterator[RedisHA]:
    require_binaries()
    with tempfile.TemporaryDirectory(prefix="im-redis-ha-") as tmp:
        ha = RedisHA(Path(tmp)).start()
        try:
            yield ha
        finally:
            ha.close()


def _counter(server: ServerProcess, kind: str) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=5).read().decode()
    found = re.search(rf'^im_errors_total\{{kind="{kind}"\}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


async def _wait_for(what: str, check: object, timeout: float) -> float:
    """Poll ``check()`` (sync, run in a thread) until true; return the seconds it took."""
    started = time.monotonic()
    while not await asyncio.to_thread(check):  # type: ignore[arg-type]
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


class _Stream:
    """A sender on one node streaming to a receiver on the other; records acks and arrivals."""

    def __init__(self, sender: Client, receiver: Client, conv: int) -> None:
        self.sender, self.receiver, self.conv = sender, receiver, conv
        self.acked: dict[str, int] = {}
        self.received: list[int] = []
        self.arrived: list[float] = []  # monotonic time of each arrival
        self.acked_at: list[float] = []  # and of each ack
        self.stop = asyncio.Event()

    async def send(self) -> None:
        for i in range(MAX_SENDS):
            if self.stop.is_set():
                return
            ack = await self.sender.send(self.conv, {"i": i}, timeout=3, attempts=30)
            self.acked[ack.cid] = ack.seq
            self.acked_at.append(time.monotonic())
            await asyncio.sleep(SEND_EVERY)
        raise AssertionError(f"still sending after {MAX_SENDS} messages")

    async def receive(self) -> None:
        async for msg in self.receiver.messages():
            self.received.append(msg.seq)
            self.arrived.append(time.monotonic())

    def complete(self) -> bool:
        return sorted(self.acked.values()) == self.received


async def _streams(stack: Stack) -> list[_Stream]:
    """node1 -> node2 and node2 -> node1: each direction needs the other node's fan-out."""
    a, b = stack.servers
    streams = []
    for src, dst in ((a, b), (b, a)):
        s_name, _ = await make_user(stack, src.url)
        r_name, r_id = await make_user(stack, src.url)
        sender = await login(src.url, s_name)
        receiver = await login(dst.url, r_name)
        streams.append(_Stream(sender, receiver, await sender.direct(r_id)))
    return streams


@pytest.mark.parametrize("fault", ["freeze", "kill", "switchover"])
async def test_redis_master_lost_fan_out_follows_sentinel(redis_ha: RedisHA, fault: str) -> None:
    """The master that holds both nodes' subscriptions is frozen with SIGSTOP (its sockets
    stay open and silent), killed, or demoted by a Sentinel switchover (it stays up as a
    replica); the replica becomes master. Both nodes move to it on their own, and every
    acked message reaches its receiver, in order, once."""
    with Stack(redis_url=redis_ha.url, fsync=False, extra_env={**FAST, **redis_ha.env()}) as st:
        st.add_server()
        st.add_server()
        streams = await _streams(st)
        tasks = [asyncio.create_task(c) for s in streams for c in (s.send(), s.receive())]
        try:
            await asyncio.sleep(1.0)
            old = redis_ha.master_port()
            assert old is not None
            if fault == "switchover":
                await asyncio.to_thread(redis_ha.switchover)
            else:
                redis_ha.server(old).signal(signal.SIGSTOP if fault == "freeze" else
                                            signal.SIGKILL)
            frozen_at = time.monotonic()
            promoted = await _wait_for("a replica promoted",
                                       lambda: redis_ha.master_port() not in (None, old), 60)
            # without the health check a frozen master's subscribers wait here forever
            await _wait_for("deliveries after the fault",
                            lambda: all(s.arrived and s.arrived[-1] > frozen_at + promoted
                                        for s in streams), 60)
            resumed = [next(t for t in s.arrived if t > frozen_at) - frozen_at for s in streams]
            await asyncio.sleep(2.0)  # live traffic after the move
            for s in streams:
                s.stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks[::2]), 30)
            await _wait_for("every acked message received",
                            lambda: all(s.complete() for s in streams), 20)
            for task in tasks[1::2]:
                task.cancel()  # next_message below reads the inbox itself
            for s in streams:
                # the live path works again: a new message arrives without a gap to sync
                ack = await s.sender.send(s.conv, "after", timeout=3, attempts=3)
                assert (await s.receiver.next_message(timeout=5)).seq == ack.seq
                stored = await s.receiver.history(s.conv, limit=1000)
                assert {m.cid: m.seq for m in stored if m.cid in s.acked} == s.acked
            assert all(_counter(n, "redis_master_changed") >= 1 for n in st.servers)
            silent = [_counter(n, "redis_subscription_silent") for n in st.servers]
            print(f"\nredis {fault}: Sentinels promoted after {promoted:.1f}s; deliveries"
                  f" resumed after {', '.join(f'{t:.1f}' for t in resumed)}s;"
                  f" silent-subscription detections per node {silent};"
                  f" messages {sum(len(s.acked) for s in streams)}")
        finally:
            for task in tasks:
                task.cancel()
            for s in streams:
                await s.sender.close()
                await s.receiver.close()


@pytest.fixture
def pg_pair() -> Iterator[tuple[Postgres, Postgres]]:
    """A primary and a synchronous streaming standby (as Patroni's synchronous_mode keeps
    them), removed afterwards, also when starting them fails."""
    require_binaries()
    with tempfile.TemporaryDirectory(prefix="im-pg-pair-") as tmp:
        os.chmod(tmp, 0o755)
        primary = Postgres(Path(tmp) / "pg1", fsync=False)
        standby = Postgres(Path(tmp) / "pg2", fsync=False, standby_of=primary)
        try:
            primary.start()
            standby.start()
            primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            primary.sql("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while primary.sql("SELECT string_agg(sync_state, ',') FROM pg_stat_replication") \
                    != "sync":
                assert time.monotonic() < deadline, "standby not synchronous within 30s"
                time.sleep(0.1)
            yield primary, standby
        finally:
            primary.freeze(False)
            standby.stop()
            primary.stop()


def _ready_sync(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(server.url + "/readyz", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def _ready(server: ServerProcess) -> int:
    return await asyncio.to_thread(_ready_sync, server)


@pytest.mark.parametrize("fault", ["stop", "freeze"])
async def test_postgres_standby_promoted_writes_recover(pg_pair: tuple[Postgres, Postgres],
                                                        fault: str) -> None:
    """The primary dies (``stop``: immediate shutdown, no checkpoint) or goes silent
    (``freeze``: SIGSTOP, as when partitioned) under a stream of sends, then the standby
    is promoted: sends fail `unavailable` meanwhile, then succeed through the same server
    process, and every acked message is stored once. The DSN starts with a host where
    nothing listens; with ``stop`` the standby comes next (migrations, the pool and the
    writer skip it), with ``freeze`` the old primary does (it must not hold up every
    connect after the promotion)."""
    primary, standby = pg_pair
    hosts = [f"127.0.0.1:{free_port()}", standby.address, primary.address]
    if fault == "freeze":
        hosts[1:] = hosts[:0:-1]
    dsn = f"postgresql://im@{','.join(hosts)}/im?target_session_attrs=read-write"
    with Stack(database_url=dsn, fsync=False, extra_env=FAST) as st:
        node = st.add_server()  # IM_MIGRATE_ON_START: the migrations ran through that DSN
        (a_name, _), (b_name, b_id) = [await make_user(st, node.url) for _ in range(2)]
        a = await login(node.url, a_name)
        b = await login(node.url, b_name)
        conv = await a.direct(b_id)
        stream = _Stream(a, b, conv)
        first = await a.send(conv, "before")
        stream.acked[first.cid] = first.seq
        assert primary.sql("SELECT count(*) FROM messages") == "1"
        assert standby.sql("SELECT pg_is_in_recovery()") == "t"
        sender = asyncio.create_task(stream.send())
        try:
            await asyncio.sleep(1.0)
            if fault == "freeze":
                primary.freeze()
            else:
                await asyncio.to_thread(primary.stop, immediate=True)
            killed_at = time.monotonic()
            with pytest.raises(ImError) as err:
                await a.send(conv, "during", cid="during-1", attempts=1, timeout=15)
            assert "unavailable" in str(err.value), err.value
            assert await _ready(node) == 503
            await asyncio.sleep(2.0)  # no primary for a while, as until Patroni promotes
            promoting_at = time.monotonic()
            await asyncio.to_thread(standby.promote)
            promoted_at = time.monotonic()
            await _wait_for("a send acked after the promotion",
                            lambda: stream.acked_at and stream.acked_at[-1] > promoting_at, 30)
            await _wait_for("/readyz 200 again", lambda: _ready_sync(node) == 200, 30)
            ready_at = time.monotonic()
            ack = await a.send(conv, "during", cid="during-1", attempts=10)
            stream.acked[ack.cid] = ack.seq
            await asyncio.sleep(1.0)
            stream.stop.set()
            await asyncio.wait_for(sender, 30)
        finally:
            sender.cancel()
        stored = await b.history(conv, limit=1000)
        # every ack is there, once, with the seq it was acked with, and no gap in between
        assert {m.cid: m.seq for m in stored} == stream.acked
        assert [m.seq for m in stored] == list(range(1, len(stored) + 1))
        assert standby.sql("SELECT count(*) FROM messages") == str(len(stored))
        first = next(t for t in stream.acked_at if t > promoting_at)
        print(f"\npostgres {fault}: primary lost {promoting_at - killed_at:.1f}s before the"
              f" promotion (pg_ctl promote took {promoted_at - promoting_at:.2f}s); first"
              f" send acked {first - promoting_at:.2f}s after the promotion began,"
              f" /readyz 200 {ready_at - promoting_at:.2f}s after;"
              f" {len(stored)} messages stored, all acked ones present")
        await a.close()
        await b.close()
