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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .metrics import Metrics

__all__ = ["KICK", "PRESENCE", "RESYNC", "Fanout", "Record", "decode_payload", "encode_payload"]

log = logging.getLogger("im_server.fanout")

CHANNEL_PREFIX = "im:fanout:"
NODES = "im:nodes"
KICK = "!kick"  # fields: user id, device id (0 = every device of the user)
RESYNC = "!resync"  # every node tells its clients to sync
PRESENCE = "!presence"  # fields: user id, 1 online / 0 offline

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
        url: str,
        node: str,
        metrics: Metrics,
        *,
        ca_file: str | None,
        presence_ttl_s: int,
        on_records: Callable[[list[Record]], None],
        on_resubscribed: Callable[[], None],
        local_users: Callable[[], Iterable[int]],
    ) -> None:
        kwargs: dict[str, object] = {"socket_timeout": 5, "socket_connect_timeout": 3}
        if ca_file and url.startswith("rediss://"):
            kwargs["ssl_ca_certs"] = ca_file
        self.redis = aioredis.from_url(url, **kwargs)
        self._sub_redis = aioredis.from_url(url, **{**kwargs, "socket_timeout": None})
        self.node = node
        self.metrics = metrics
        self.ttl = presence_ttl_s
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
            self._sub_redis.aclose(),
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
            pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL_PREFIX + self.node)
                await self._register()
                self.subscribed = True
                self.metrics.redis_up.set(1)
                delay = 0.1
                if self._resync_on_subscribe:
                    log.warning("redis subscription restored: clients re-sync")
                    self.on_resubscribed()
                self._resync_on_subscribe = True
                self._registered.set()
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        self.on_records(decode_payload(msg["data"])[1])
                    except Exception:  # one bad payload must not end this node's fan-out
                        log.exception("fan-out payload dropped")
                        self.metrics.errors.labels("fanout_payload").inc()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if self.subscribed:
                    log.warning("redis subscription lost: %s", exc)
                    self.metrics.errors.labels("redis_subscription").inc()
                self.subscribed = False
                self.metrics.redis_up.set(0)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1)
                except (RedisError, OSError, TimeoutError):
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

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
