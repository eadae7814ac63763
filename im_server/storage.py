"""PostgreSQL access (asyncpg): accounts, conversations, positions, and the group-commit writer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from .metrics import Metrics
from .protocol import ErrorCode

log = logging.getLogger("im_server.storage")

__all__ = ["Conflict", "Forbidden", "NotFound", "Send", "Storage", "Writer"]

MAX_BATCH = 500
HOST_TIMEOUT_S = 3.0  # one host's connect; a multi-host DSN tries the next after that
RECONNECT_MAX_S = 2.0  # the writer's backoff after a failed connect grows up to this
# The database is not reachable or not writable (a failover): the sends are answered
# `unavailable`, the connection is dropped and a new one goes to the host now read-write.
_UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.exceptions.TargetServerAttributeNotMatched)


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class Forbidden(Exception):
    pass


def _ms() -> int:
    return time.time_ns() // 1_000_000


def host_dsns(dsn: str) -> list[str]:
    """One DSN per host of a multi-host DSN (``postgresql://u:p@h1:5432,h2:5432/db?...``),
    each with the same user, database and parameters; a single-host DSN as it is."""
    scheme, sep, rest = dsn.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not sep or "," not in hosts:
        return [dsn]
    return [f"{scheme}://{userinfo}{at}{host}{slash}{tail}" for host in hosts.split(",")]


class Primary:
    """Connects to the first host of a (multi-host) DSN that qualifies (with
    ``target_session_attrs=read-write``: takes writes), starting with the last one that did.

    Not asyncpg's own multi-host connect: its timeout covers all hosts together, so one
    host that drops packets (partitioned, frozen) would use it up on every connect and
    the hosts after it, the new primary among them, would never be tried.
    """

    def __init__(self, dsn: str) -> None:
        self.dsns = host_dsns(dsn)
        self.last = 0

    async def connect(self, *_dsn: object, **kwargs: Any) -> asyncpg.Connection:
        """``asyncpg.connect`` (also as the pool's ``connect``, which passes its DSN first)."""
        error: BaseException | None = None
        for i in range(len(self.dsns)):
            index = (self.last + i) % len(self.dsns)
            try:
                conn = await asyncpg.connect(self.dsns[index], **{"timeout": HOST_TIMEOUT_S,
                                                                  **kwargs})
            except _UNAVAILABLE as exc:
                error = exc
                continue
            self.last = index
            return conn
        assert error is not None
        raise error


class Storage:
    """Every SQL statement of the server lives here.

    The DSN may list several hosts (``postgresql://u:p@h1:5432,h2:5432/db?
    target_session_attrs=read-write``): each new connection goes to the one that takes
    writes (see :class:`Primary`). A connection that breaks in a failover is dropped
    (the pool's on its next use), so new ones find the new primary.
    """

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics, primary: Primary) -> None:
        self.pool = pool
        self.metrics = metrics
        self.primary = primary

    @classmethod
    async def open(cls, dsn: str, size: int, metrics: Metrics) -> Storage:
        primary = Primary(dsn)
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=size, command_timeout=10, max_inactive_connection_lifetime=60,
            connect=primary.connect,
        )
        return cls(pool, metrics, primary)

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool, for a caller that keeps it (the writer).

        The pool's release runs a reset query: one more round trip per commit.
        """
        return await self.primary.connect(command_timeout=10)

    async def close(self) -> None:
        await asyncio.wait_for(self.pool.close(), 5)

    async def ping(self) -> None:
        async with self.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    # -- accounts ---------------------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str) -> int:
        try:
            return await self.pool.fetchval(
                "INSERT INTO users (username, password_hash) VALUES ($1, $2) RETURNING id",
                username,
                password_hash,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"user {username!r} exists") from None

    async def list_users(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT id, username, disabled, created_at FROM users WHERE deleted_at IS NULL"
            " ORDER BY id"
        )
        return [
            {"id": r["id"], "username": r["username"], "disabled": r["disabled"],
             "created_at": r["created_at"].isoformat()}
            for r in rows
        ]

    async def user_for_login(self, username: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT id, password_hash, disabled FROM users"
            " WHERE username = $1 AND deleted_at IS NULL",
            username,
        )

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        await self.pool.execute(
            "UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash
        )

    async def disable_user(self, username: str) -> tuple[int, list[int]]:
        """Disable a user and revoke all their devices; returns (user id, revoked device ids)."""
        return await self._retire_user(
            "UPDATE users SET disabled = true WHERE username = $1 AND deleted_at IS NULL"
            " RETURNING id",
            username,
        )

    async def delete_user(self, username: str) -> tuple[int, list[int]]:
        """Delete a user: disabled for good, name free again, messages kept for the others.

        Returns (user id, revoked device ids); NotFound if no live user has that name.
        """
        return await self._retire_user(
            "UPDATE users SET disabled = true, deleted_at = now()"
            " WHERE username = $1 AND deleted_at IS NULL RETURNING id",
            username,
        )

    async def _retire_user(self, update: str, username: str) -> tuple[int, list[int]]:
        async with self.pool.acquire() as conn, conn.transaction():
            uid = await conn.fetchval(update, username)
            if uid is None:
                raise NotFound(f"no user {username!r}")
            rows = await conn.fetch(
                "UPDATE devices SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL"
                " RETURNING id",
                uid,
            )
        return uid, [r[0] for r in rows]

    async def enable_user(self, username: str) -> int:
        """Re-enable a disabled user (their old devices stay signed out); returns the id."""
        uid = await self.pool.fetchval(
            "UPDATE users SET disabled = false WHERE username = $1 AND deleted_at IS NULL"
            " RETURNING id",
            username,
        )
        if uid is None:
            raise NotFound(f"no user {username!r}")
        return uid

    async def create_device(self, user_id: int, name: str, refresh_hash: bytes) -> int:
        return await self.pool.fetchval(
            "INSERT INTO devices (user_id, name, refresh_hash) VALUES ($1, $2, $3) RETURNING id",
            user_id,
            name,
            refresh_hash,
        )

    async def rotate_refresh(self, old_hash: bytes, new_hash: bytes) -> tuple[int, int] | None:
        """Swap a live refresh token for a new one; None if unknown, revoked or user disabled."""
        row = await self.pool.fetchrow(
            "UPDATE devices d SET refresh_hash = $2 FROM users u"
            " WHERE d.refresh_hash = $1 AND d.revoked_at IS NULL AND u.id = d.user_id"
            " AND NOT u.disabled RETURNING d.user_id, d.id",
            old_hash,
            new_hash,
        )
        return (row[0], row[1]) if row else None

    async def revoke_device(self, device_id: int) -> None:
        await self.pool.execute(
            "UPDATE devices SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", device_id
        )

    async def device_active(self, user_id: int, device_id: int) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT true FROM devices d JOIN users u ON u.id = d.user_id WHERE d.id = $1"
                " AND d.user_id = $2 AND d.revoked_at IS NULL AND NOT u.disabled",
                device_id,
                user_id,
            )
        )

    # -- conversations ----------------------------------------------------------------------

    async def direct(self, user_id: int, other_id: int) -> int:
        """The one direct conversation between two users, created on first use."""
        if user_id == other_id:
            raise Conflict("a direct conversation needs two different users")
        low, high = sorted((user_id, other_id))
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(
                "SELECT count(*) FROM users WHERE id = $1 AND NOT disabled", other_id
            ) != 1:
                raise NotFound(f"no user {other_id}")
            conv = await conn.fetchval(
                "INSERT INTO conversations (kind, direct_key) VALUES ('direct', $1)"
                " ON CONFLICT (direct_key) DO UPDATE SET direct_key = EXCLUDED.direct_key"
                " RETURNING id",
                f"{low}:{high}",
            )
            await conn.execute(
                "INSERT INTO members (conversation_id, user_id) SELECT $1, unnest($2::bigint[])"
                " ON CONFLICT DO NOTHING",
                conv,
                [low, high],
            )
        return conv

    async def _check_users(self, conn: asyncpg.Connection, ids: Sequence[int]) -> None:
        found = await conn.fetchval(
            "SELECT count(*) FROM users WHERE id = ANY($1::bigint[]) AND deleted_at IS NULL",
            list(set(ids)),
        )
        if found != len(set(ids)):
            raise NotFound("unknown user id in members")

    async def create_group(self, creator: int, title: str, members: Sequence[int]) -> int:
        ids = sorted({creator, *members})
        async with self.pool.acquire() as conn, conn.transaction():
            await self._check_users(conn, ids)
            conv = await conn.fetchval(
                "INSERT INTO conversations (kind, title) VALUES ('group', $1) RETURNING id", title
            )
            await conn.execute(
                "INSERT INTO members (conversation_id, user_id) SELECT $1, unnest($2::bigint[])",
                conv,
                ids,
            )
        return conv

    async def _group_for_member(self, conn: asyncpg.Connection, conv: int, user: int) -> None:
        row = await conn.fetchrow(
            "SELECT c.kind FROM conversations c JOIN members m ON m.conversation_id = c.id"
            " WHERE c.id = $1 AND m.user_id = $2 FOR UPDATE OF c",
            conv,
            user,
        )
        if row is None:
            raise Forbidden("not a member of this conversation")
        if row[0] != "group":
            raise Conflict("direct conversations have fixed members")

    async def rename(self, conv: int, user: int, title: str) -> list[int]:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._group_for_member(conn, conv, user)
            await conn.execute("UPDATE conversations SET title = $2 WHERE id = $1", conv, title)
            return await self._members(conn, conv)

    async def add_members(self, conv: int, user: int, ids: Sequence[int]) -> list[int]:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._group_for_member(conn, conv, user)
            await self._check_users(conn, ids)
            await conn.execute(
                "INSERT INTO members (conversation_id, user_id) SELECT $1, unnest($2::bigint[])"
                " ON CONFLICT DO NOTHING",
                conv,
                list(ids),
            )
            return await self._members(conn, conv)

    async def remove_member(self, conv: int, user: int, target: int) -> list[int]:
        """Remove ``target`` (``target == user`` is leaving); returns the members before."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._group_for_member(conn, conv, user)
            before = await self._members(conn, conv)
            if target not in before:
                raise NotFound(f"user {target} is not a member")
            await conn.execute(
                "DELETE FROM members WHERE conversation_id = $1 AND user_id = $2", conv, target
            )
            return before

    async def _members(self, conn: asyncpg.Connection, conv: int) -> list[int]:
        rows = await conn.fetch(
            "SELECT user_id FROM members WHERE conversation_id = $1 ORDER BY user_id", conv
        )
        return [r[0] for r in rows]

    async def members_if_member(self, conv: int, user: int) -> list[int]:
        """Members of ``conv``; raises Forbidden unless ``user`` is one of them."""
        async with self.pool.acquire() as conn:
            members = await self._members(conn, conv)
        if user not in members:
            raise Forbidden("not a member of this conversation")
        return members

    async def list_conversations(self, user: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT c.id, c.kind, c.title, c.last_seq, m.read_seq,"
            " ARRAY(SELECT user_id FROM members x WHERE x.conversation_id = c.id ORDER BY user_id)"
            " AS members FROM members m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.user_id = $1 ORDER BY c.id",
            user,
        )
        return [
            {"id": r["id"], "kind": r["kind"], "title": r["title"], "last_seq": r["last_seq"],
             "read_seq": r["read_seq"], "members": list(r["members"])}
            for r in rows
        ]

    # -- messages and positions -------------------------------------------------------------

    async def history(
        self, conv: int, user: int, after: int, limit: int, before: int | None = None
    ) -> list[asyncpg.Record]:
        """Messages with ``after < seq < before`` for a member, oldest first."""
        if not await self.pool.fetchval(
            "SELECT true FROM members WHERE conversation_id = $1 AND user_id = $2", conv, user
        ):
            raise Forbidden("not a member of this conversation")
        return await self.messages_after(conv, after, limit, before)

    async def messages_after(
        self, conv: int, after: int, limit: int, before: int | None = None
    ) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT seq, sender_id, device_id, client_msg_id,"
            " (extract(epoch FROM created_at) * 1000)::bigint AS ts, body FROM messages"
            " WHERE conversation_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq LIMIT $4",
            conv,
            after,
            before if before is not None else 2**62,
            limit,
        )

    async def sync_state(
        self, user: int, device: int
    ) -> list[tuple[int, int, int]]:
        """(conv, last_seq, stored received position of this device) for each conversation."""
        rows = await self.pool.fetch(
            "SELECT m.conversation_id, c.last_seq, COALESCE(p.received_seq, 0)"
            " FROM members m JOIN conversations c ON c.id = m.conversation_id"
            " LEFT JOIN device_positions p ON p.device_id = $2"
            " AND p.conversation_id = m.conversation_id WHERE m.user_id = $1",
            user,
            device,
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def set_received(self, device: int, conv: int, seq: int, user: int) -> bool:
        return (
            await self.pool.fetchval(
                "INSERT INTO device_positions (device_id, conversation_id, received_seq)"
                " SELECT $1::bigint, $2::bigint, $3::bigint WHERE EXISTS (SELECT 1 FROM members"
                "  WHERE conversation_id = $2 AND user_id = $4)"
                " ON CONFLICT (device_id, conversation_id) DO UPDATE"
                " SET received_seq = GREATEST(device_positions.received_seq, EXCLUDED.received_seq)"
                " RETURNING true",
                device,
                conv,
                seq,
                user,
            )
            is not None
        )

    async def set_read(self, conv: int, user: int, seq: int) -> list[int] | None:
        """Advance the user's read position; members to notify, or None if not a member."""
        async with self.pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE members SET read_seq = GREATEST(read_seq, LEAST($3,"
                " (SELECT last_seq FROM conversations WHERE id = $1)))"
                " WHERE conversation_id = $1 AND user_id = $2 RETURNING read_seq",
                conv,
                user,
                seq,
            )
            if found is None:
                return None
            return await self._members(conn, conv)


# -- group commit -------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """One pending send and, after the commit, its outcome."""

    conv: int
    sender: int
    device: int
    cid: str
    body: bytes
    origin: Any  # the connection to ack, opaque here
    started: float
    seq: int = 0
    ts: int = 0
    members: Sequence[int] = ()
    duplicate: bool = False
    error: str = ""


_COMMIT = "SELECT * FROM im_commit($1, $2, $3, $4, $5, $6)"  # migration 0009


class Writer:
    """The node's single writer task: batches pending sends into one transaction each.

    ``on_done(batch)`` runs after the commit (or failure: each ``Send.error`` set),
    before the next batch starts, so acks and fan-out leave in seq order. (Two
    batches in flight at once could lock a conversation in either order, and then
    fan-out would leave out of seq order: measured, so not done.)
    """

    def __init__(
        self, storage: Storage, on_done: Callable[[list[Send]], None], metrics: Metrics
    ) -> None:
        self.storage = storage
        self.on_done = on_done
        self.metrics = metrics
        self.pending: list[Send] = []
        self._conn: asyncpg.Connection | None = None
        self._backoff = 0.0
        self._connect_after = 0.0  # monotonic time before which no new connect is tried
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, item: Send) -> None:
        self.pending.append(item)
        self._idle.clear()
        self._wake.set()

    async def flushed(self) -> None:
        """Wait until nothing is pending or in flight."""
        await self._idle.wait()

    async def close(self) -> None:
        """Close the writer's connection; call after its task is cancelled."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except _UNAVAILABLE:
                conn.terminate()

    def _drop_connection(self) -> None:
        """After a failure the connection may be broken: the next batch opens a new one."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                await self._commit(batch)
                try:
                    self.on_done(batch)
                except Exception:  # a bug in acking must not stop the node's only writer
                    log.exception("ack/fan-out of %d sends failed", len(batch))
            self._idle.set()

    async def _commit(self, batch: list[Send]) -> None:
        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                await self._transaction(batch)
                self.metrics.db_up.set(1)
                break
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == 2:
                    self._fail(batch, "db_conflict")
            except _UNAVAILABLE as exc:
                self._drop_connection()
                self.metrics.db_up.set(0)
                log.warning("commit of %d sends failed: %r", len(batch), exc)
                self._fail(batch, "db_unavailable")
                break
            except Exception:  # a bug must not stop the node's only writer
                log.exception("commit of %d sends failed", len(batch))
                self._fail(batch, "internal")
                break
        self.metrics.db.labels("commit").observe(time.perf_counter() - started)
        self.metrics.batch.observe(len(batch))

    def _fail(self, batch: list[Send], kind: str) -> None:
        self.metrics.errors.labels(kind).inc()
        for item in batch:
            item.error = ErrorCode.UNAVAILABLE
            item.seq = 0

    async def _connection(self) -> asyncpg.Connection:
        """The open connection, or a new one, tried no sooner than the backoff allows
        (0.1 s doubling up to RECONNECT_MAX_S while connects fail: the batches in between
        wait that long, then fail `unavailable`, rather than each hammering every host)."""
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        await asyncio.sleep(max(0.0, self._connect_after - time.monotonic()))
        try:
            self._conn = await self.storage.connect()
        except BaseException:
            self._backoff = min(max(0.1, self._backoff * 2), RECONNECT_MAX_S)
            self._connect_after = time.monotonic() + self._backoff
            raise
        self._backoff = 0.0
        return self._conn

    async def _transaction(self, batch: list[Send]) -> None:
        """One statement, one round trip (see migrations/0009).

        A retry that is in the batch twice is sent once and both get the one result.
        """
        first: dict[tuple[int, int, str], Send] = {}
        unique: list[Send] = []
        for item in batch:
            key = (item.conv, item.sender, item.cid)
            if key not in first:
                first[key] = item
                unique.append(item)
        conn = await self._connection()
        rows = await conn.fetch(
            _COMMIT,
            [i.conv for i in unique],
            [i.sender for i in unique],
            [i.device for i in unique],
            [i.cid for i in unique],
            [i.body.decode() for i in unique],
            [_ms()] * len(unique),
        )
        fresh = 0
        for idx, seq, ts, status, members in rows:
            item = unique[idx - 1]
            if status == "not_member":
                item.error, item.seq = ErrorCode.NOT_MEMBER, 0
                continue
            item.error, item.seq, item.ts, item.members = "", seq, ts, members
            item.duplicate = status == "duplicate"
            fresh += not item.duplicate
        for item in batch:
            source = first[(item.conv, item.sender, item.cid)]
            if source is not item:
                item.error, item.seq, item.ts = source.error, source.seq, source.ts
                item.members, item.duplicate = source.members, True
        self.metrics.messages.inc(fresh)
