"""Cross-node fan-out and presence over Redis.

Each node subscribes to its own channel ``im:fanout:<node>`` and lists itself in the
set ``im:nodes``. A publish is one call of a Lua script (:data:`_FANOUT_LUA`) that
sends the payload to the channel of every *other* node in that set, so a node never
reads back its own publishes and a node alone publishes nothing. A payload is the
origin node id on the first line, then one record per line:
``<user ids, comma separated>\\t<device id to skip>\\t<frame JSON>``. Control
records have a first field starting with ``!`` (see :data:`KICK`, :data:`RESYNC`,
:data:`PRESENCE`). Pub/sub is only a wake-up path: PostgreSQL holds every message,
and a node whose subscription broke tells its clients to re-sync once it is back.

Why no live message is missed by a node that joins (or rejoins after losing Redis):
the node subscribes to its channel *first*, then adds itself to ``im:nodes``, and
only then accepts WebSockets (at start) or tells its clients to re-sync (after a
loss). The script reads ``im:nodes`` and publishes atomically, after the message
was committed. So for a message committed on another node either the script ran
after the ``SADD`` (the joining node is subscribed and gets it live), or it ran
before, and then the commit was visible before the node accepted the socket or
sent ``resync``, so the client's sync after connecting (or after ``resync``) reads
it from PostgreSQL. The script drops a node from ``im:nodes`` only when nobody
listens on its channel and its liveness key has expired; such a node re-adds itself
(and re-syncs its clients) when its subscription comes back.

A subscription can also break without an error: the server holding it frozen, a
network path that silently drops, or (with Sentinel) a master that was replaced
while this node still talks to the old one. So each node probes its own channel:
every third of ``IM_REDIS_HEALTH_TIMEOUT_S`` it asks the Sentinels for the master
(dropping idle connections to a replaced one) and publishes a :data:`PROBE` record
on its own channel through the connections every publish takes. A node that gets
no probe back that was sent within the timeout treats its subscription as lost:
it subscribes again, on the master the Sentinels name now, re-adds itself to
``im:nodes`` (asynchronous replication may have lost that write on the new
master) and tells its clients to re-sync, as after any loss.

Why a master change leaves no silent gap: a node's subscription and publishes
that failed are covered as above. What is left is a publish that *worked*, but
on a master the other nodes had already left (the old master still alive and
cut off from the Sentinels, or not yet noticed as dead). A node whose new
subscription is on another address than its last one therefore publishes a
:data:`RESYNC` to every node on the new master once it is listed there. Every
message it published on the old master was committed before that, so each node
either gets the ``RESYNC`` (it is listed on the new master) or lists itself later
and re-syncs its own clients then. Each step is bounded by the probe timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from .metrics import Metrics
from .settings import Settings, sentinel_addresses

__all__ = [
    "KICK", "PRESENCE", "PROBE", "RESYNC", "Fanout", "Record", "decode_payload",
    "encode_payload", "redis_client",
]

log = logging.getLogger("im_server.fanout")

CHANNEL_PREFIX = "im:fanout:"
NODES = "im:nodes"
KICK = "!kick"  # fields: user id, device id (0 = every device of the user)
RESYNC = "!resync"  # every node tells its clients to sync
PRESENCE = "!presence"  # fields: user id, 1 online / 0 offline
PROBE = "!probe"  # field: the sender's monotonic clock; only ever on the sender's own channel

Record = tuple[str, str, bytes]  # (users or control word, second field, frame)

# KEYS[1] = the node set; ARGV = origin node, payload. Returns the number of receivers.
_FANOUT_LUA = """
local sent = 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[1] then
    local got = redis.call('PUBLISH', 'im:fanout:' .. node, ARGV[2])
    if got == 0 and redis.call('EXISTS', 'im:node:' .. node) == 0 then
      redis.call('SREM', KEYS[1], node)
    end
    sent = sent + got
  end
end
return sent
"""


def redis_client(settings: Settings) -> aioredis.Redis:
    """The node's one Redis client: ``IM_REDIS_URL``'s server, or the master the Sentinels name.

    Timeouts bound every command and connect (a frozen server must not hang a caller),
    and a failed command is retried once at once on a fresh connection (the Sentinels
    kill the clients of a promoted or demoted server), not three times with backoff.
    """
    common: dict[str, Any] = {
        "socket_timeout": 5, "socket_connect_timeout": 3, "retry": Retry(NoBackoff(), 1),
    }
    url = settings.redis_url
    tls = url.startswith("rediss://")
    if tls and settings.tls_ca_file:
        common["ssl_ca_certs"] = settings.tls_ca_file
    sentinels = sentinel_addresses(settings.redis_sentinels)
    if not sentinels:
        return aioredis.from_url(url, **common)
    parsed = parse_url(url)
    # The Sentinels listen TLS only; short timeouts: the next Sentinel is asked at once.
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs={
            **common, "socket_timeout": 1, "socket_connect_timeout": 1, "ssl": True,
            "ssl_ca_certs": settings.tls_ca_file,
            "password": settings.redis_sentinel_password or None,
        },
    )
    return sentinel.master_for(
        settings.redis_sentinel_master, **common, ssl=tls, username=parsed.get("username"),
        password=parsed.get("password"), db=parsed.get("db", 0),
    )


class SubscriptionSilent(RedisConnectionError):
    """No probe came back on this node's own channel in time (see the module docstring)."""


def encode_payload(node: str, records: Iterable[Record]) -> bytes:
    lines = [node.encode()]
    for users, extra, frame in records:
        lines.append(b"%s\t%s\t%s" % (users.encode(), extra.encode(), frame))
    return b"\n".join(lines)


def decode_payload(payload: bytes) -> tuple[str, list[Record]]:
    """Inverse of :func:`encode_payload`. Frames are JSON, which never holds a raw newline."""
    head, *lines = payload.split(b"\n")
    records = []
    for line in lines:
        users, extra, frame = line.split(b"\t", 2)
        records.append((users.decode(), extra.decode(), frame))
    return head.decode(), records


class Fanout:
    """Publisher, subscriber and presence registry of one node.

    Args:
        on_records: called with records published by other nodes.
        on_resubscribed: called when the subscription is back after a loss.
        local_users: returns the user ids with a device connected here (for presence).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        node: str,
        metrics: Metrics,
        *,
        presence_ttl_s: int,
        health_timeout_s: float,
        on_records: Callable[[list[Record]], None],
        on_resubscribed: Callable[[], None],
        local_users: Callable[[], Iterable[int]],
    ) -> None:
        # One client (so one Sentinel-managed pool) for publishes and the subscription:
        # a subscription that reconnects to a new master moves the publishes with it.
        self.redis = redis
        self.node = node
        self.metrics = metrics
        self.ttl = presence_ttl_s
        self.health_s = health_timeout_s
        self.on_records = on_records
        self.on_resubscribed = on_resubscribed
        self.local_users = local_users
        self.subscribed = False
        self._outbox: list[Record] = []
        self._wake = asyncio.Event()
        self._publish_failed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._fanout = self.redis.register_script(_FANOUT_LUA)
        self._registered = asyncio.Event()
        self._resync_on_subscribe = False
        self._address: tuple[str, int] | None = None  # server of the last subscription
        self._echoed = 0.0  # send time of the newest probe that came back

    async def start(self, *, wait_s: float = 5.0) -> None:
        """Start the tasks and wait (bounded) until this node is subscribed and listed.

        Call before accepting WebSockets: a client that connects later is either
        reached by every publish or syncs past it (see the module docstring). If
        Redis is not there yet, the node starts anyway and its clients re-sync once
        the subscription is up.
        """
        self._tasks = [
            asyncio.create_task(self._subscriber(), name="fanout-sub"),
            asyncio.create_task(self._publisher(), name="fanout-pub"),
            asyncio.create_task(self._heartbeat(), name="presence"),
        ]
        try:
            await asyncio.wait_for(self._registered.wait(), wait_s)
        except TimeoutError:
            log.warning("redis subscription not up after %.0fs: starting anyway", wait_s)
        self._resync_on_subscribe = True

    async def stop(self) -> None:
        """Best effort, bounded: Redis may be the thing that is down."""
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=2)
        for step in (
            self.redis.srem(NODES, self.node),
            self.redis.delete(f"im:node:{self.node}"),
            self.redis.aclose(),
        ):
            try:
                await asyncio.wait_for(step, 2)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("redis shutdown step failed: %r", exc)

    def publish(self, records: Sequence[Record]) -> None:
        """Queue records for the other nodes; never blocks the caller."""
        self._outbox.extend(records)
        self._wake.set()

    async def ping(self) -> None:
        await asyncio.wait_for(self.redis.ping(), 2)

    async def _publisher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                chunk, self._outbox = self._outbox[:1000], self._outbox[1000:]
                started = time.perf_counter()
                try:
                    payload = encode_payload(self.node, chunk)
                    await self._fanout(keys=[NODES], args=[self.node, payload])
                except (RedisError, OSError, TimeoutError) as exc:
                    # Subscribers lost these records: once Redis answers again every
                    # node is told to re-sync its clients from PostgreSQL.
                    if not self._publish_failed:
                        log.warning("redis publish failed: %s", exc)
                    self._publish_failed = True
                    self.metrics.errors.labels("redis_publish").inc()
                    self._outbox.clear()
                    break
                self.metrics.redis.labels("publish").observe(time.perf_counter() - started)
                if self._publish_failed:
                    self._publish_failed = False
                    self.publish([(RESYNC, "", b"{}")])
                    self.on_resubscribed()

    async def _register(self) -> None:
        """List this node in the node set (after subscribing: see the module docstring)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"im:node:{self.node}", "1", ex=self.ttl)
        pipe.sadd(NODES, self.node)
        await pipe.execute()

    async def _subscriber(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            prober: asyncio.Task[None] | None = None
            try:
                await asyncio.wait_for(pubsub.subscribe(CHANNEL_PREFIX + self.node),
                                       self.health_s)
                await asyncio.wait_for(self._register(), self.health_s)
                address = _peer(pubsub)
                moved = self._address not in (None, address)
                self._address = address
                self.subscribed = True
                self.metrics.redis_up.set(1)
                delay = 0.1
                if self._resync_on_subscribe:
                    log.warning("redis subscription restored on %s:%s: clients re-sync",
                                *address)
                    self.on_resubscribed()
                if moved:
                    # This node may have published on the old master after the others
                    # left it: they re-sync too (see the module docstring).
                    self.metrics.errors.labels("redis_master_changed").inc()
                    self.publish([(RESYNC, "", b"{}")])
                self._resync_on_subscribe = True
                self._registered.set()
                self._echoed = time.monotonic()
                prober = asyncio.create_task(self._probe(), name="fanout-probe")
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if self.subscribed:
                    log.warning("redis subscription lost: %r", exc)
                    self.metrics.errors.labels("redis_subscription").inc()
                self.subscribed = False
                self.metrics.redis_up.set(0)
            finally:
                if prober is not None:
                    prober.cancel()
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1)
                except (RedisError, OSError, TimeoutError):
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        """Hand other nodes' records on until the subscription errs or goes silent."""
        while True:
            msg = await pubsub.get_message(timeout=self.health_s / 3)
            if msg is not None and msg.get("type") == "message":
                try:
                    self._received(msg["data"])
                except Exception:  # one bad payload must not end this node's fan-out
                    log.exception("fan-out payload dropped")
                    self.metrics.errors.labels("fanout_payload").inc()
            if time.monotonic() - self._echoed > self.health_s:
                self.metrics.errors.labels("redis_subscription_silent").inc()
                raise SubscriptionSilent(f"no probe back within {self.health_s}s")

    def _received(self, payload: bytes) -> None:
        records = decode_payload(payload)[1]
        if records and records[0][0] == PROBE:
            sent = float(records[0][1])
            self._echoed = max(self._echoed, sent)
            self.metrics.redis.labels("probe").observe(time.monotonic() - sent)
            return
        self.on_records(records)

    async def _probe(self) -> None:
        """Publish a probe on this node's own channel every third of the health timeout."""
        channel = CHANNEL_PREFIX + self.node
        pool = self.redis.connection_pool
        while True:
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self.health_s):
                    if isinstance(pool, SentinelConnectionPool):
                        # a new master: the pool drops its idle connections to the old one
                        await pool.get_master_address()
                    await self.redis.publish(
                        channel, encode_payload(self.node, [(PROBE, repr(sent), b"{}")]))
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("redis probe failed: %r", exc)
            await asyncio.sleep(max(0.0, sent + self.health_s / 3 - time.monotonic()))

    # -- presence ---------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Refresh this node's and its users' presence keys; they expire if the node dies."""
        while True:
            started = time.perf_counter()
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.set(f"im:node:{self.node}", "1", ex=self.ttl)
                pipe.sadd(NODES, self.node)
                for user in self.local_users():
                    pipe.set(f"im:online:{user}:{self.node}", "1", ex=self.ttl)
                await pipe.execute()
                self.metrics.redis.labels("heartbeat").observe(time.perf_counter() - started)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("presence heartbeat failed: %s", exc)
            await asyncio.sleep(self.ttl / 3)

    async def set_online(self, user: int, online: bool) -> None:
        key = f"im:online:{user}:{self.node}"
        try:
            if online:
                await self.redis.set(key, "1", ex=self.ttl)
            else:
                await self.redis.delete(key)
        except (RedisError, OSError, TimeoutError):
            self.metrics.errors.labels("redis_presence").inc()
            return
        self.publish([(PRESENCE, f"{user},{int(online)}", b"{}")])

    async def online(self, users: Sequence[int]) -> dict[int, bool]:
        """Which users have a device on a live node (keys of a dead node expire)."""
        started = time.perf_counter()
        nodes = [n.decode() if isinstance(n, bytes) else n
                 for n in await self.redis.smembers(NODES)]
        pipe = self.redis.pipeline(transaction=False)
        for user in users:
            pipe.exists(*[f"im:online:{user}:{n}" for n in nodes] or ["im:none"])
        counts = await pipe.execute()
        self.metrics.redis.labels("presence").observe(time.perf_counter() - started)
        return {u: c > 0 for u, c in zip(users, counts, strict=True)}


def _peer(pubsub: aioredis.client.PubSub) -> tuple[str, int]:
    conn = pubsub.connection
    assert conn is not None  # subscribed
    return str(getattr(conn, "host", "")), int(getattr(conn, "port", 0))
