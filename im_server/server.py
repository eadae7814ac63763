"""The aiohttp application: WebSocket messaging, HTTP API, health, metrics, drain."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import signal
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .auth import Claims, Passwords, TokenError, Tokens, hash_refresh, new_refresh
from .fanout import KICK, PRESENCE, RESYNC, Fanout, Record, redis_client
from .metrics import Metrics
from .migrate import applied_versions, available, migrate
from .protocol import (
    CloseCode,
    ErrorCode,
    Frame,
    ProtocolError,
    RateLimiter,
    encode,
    message_frame,
    parse_frame,
)
from .settings import Settings
from .storage import Conflict, Forbidden, NotFound, Send, Storage, Writer

__all__ = ["Node", "build_app", "serve"]

log = logging.getLogger("im_server")

NODE: web.AppKey[Node] = web.AppKey("node")
SLOW_CONSUMER_BYTES = 4 * 1024 * 1024
MAX_STRIKES = 200  # refused frames in a row before a flooding client is closed
SYNC_LIMIT = 1000  # messages per conversation per sync round

_OP_TEXT = 0x81
_conn_ids = itertools.count(1)


def _header(size: int) -> bytes:
    if size < 126:
        return struct.pack("!BB", _OP_TEXT, size)
    if size < 65536:
        return struct.pack("!BBH", _OP_TEXT, 126, size)
    return struct.pack("!BBQ", _OP_TEXT, 127, size)


class Conn:
    """One authenticated WebSocket. Kept small: thousands of these sit idle."""

    __slots__ = (
        "ws", "transport", "user", "device", "limiter", "watching", "id", "opened",
        "frames_in", "frames_out", "peer", "node", "expiry",
    )

    def __init__(self, node: Node, ws: web.WebSocketResponse, request: web.Request,
                 claims: Claims) -> None:
        self.node = node
        self.ws = ws
        self.transport = request.transport
        self.user = claims.user
        self.device = claims.device
        s = node.settings
        self.limiter = RateLimiter(s.rate_per_s, s.rate_burst, time.monotonic())
        self.watching: set[int] | None = None
        self.id = next(_conn_ids)
        self.opened = time.monotonic()
        self.frames_in = 0
        self.frames_out = 0
        self.peer = request.remote or "-"
        self.expiry = self._close_at(claims.expires)

    def _close_at(self, expires: int) -> asyncio.TimerHandle:
        """A socket must not outlive its access token: closed with 4001 at ``expires``
        (unix seconds) unless an ``auth`` frame brings a newer token first (see
        :meth:`expire_at`). Cancelled in unregister."""
        return asyncio.get_running_loop().call_later(
            max(0.0, expires - time.time()),
            self.close, CloseCode.TOKEN_EXPIRED, "access token expired: refresh and reconnect",
        )

    def expire_at(self, expires: int) -> None:
        self.expiry.cancel()
        self.expiry = self._close_at(expires)

    def send(self, data: bytes) -> None:
        """Write one text frame now, without awaiting (the payload is encoded once by callers).

        aiohttp writes uncompressed frames synchronously too, so frames never interleave.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > SLOW_CONSUMER_BYTES:
            self.node.metrics.errors.labels("slow_consumer").inc()
            self.close(CloseCode.SLOW, "slow consumer: not reading its frames")
            return
        transport.write(_header(len(data)) + data)
        self.frames_out += 1
        self.node.metrics.frames_out += 1

    def close(self, code: int, reason: str) -> None:
        if not self.ws.closed:
            self.node.spawn(self.ws.close(code=code, message=reason.encode()[:120]))


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": code, "message": message}, status)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Node:
    """All state of one server process: connections, storage, fan-out, writer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.tokens = Tokens(settings.token_secret, settings.access_token_ttl_s)
        self.passwords = Passwords(settings.argon2_time_cost, settings.argon2_memory_kib)
        self.by_user: dict[int, list[Conn]] = {}
        self.watchers: dict[int, set[Conn]] = {}
        self.last_presence: dict[int, bool] = {}  # watched user -> state last pushed here
        self.draining = False
        self.storage: Storage
        self.fanout: Fanout
        self.writer: Writer
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writer_task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        if s.migrate_on_start:
            ran = await migrate(s.database_url)
            for mig in ran:
                log.info("applied migration %04d_%s", mig.version, mig.name)
        self.storage = await Storage.open(s.database_url, s.db_pool_size, self.metrics)
        async with self.storage.pool.acquire() as conn:
            missing = {m.version for m in available()} - await applied_versions(conn)
        if missing:
            await self.storage.close()
            raise RuntimeError(
                f"database schema is missing migration(s) {sorted(missing)}:"
                " run `python -m im_server migrate` (or set IM_MIGRATE_ON_START=true)"
            )
        self.metrics.db_up.set(1)
        self.writer = Writer(self.storage, self._committed, self.metrics)
        self._writer_task = asyncio.create_task(self.writer.run(), name="writer")
        self.fanout = Fanout(
            redis_client(s), s.node_id, self.metrics, presence_ttl_s=s.presence_ttl_s,
            health_timeout_s=s.redis_health_timeout_s, on_records=self._remote,
            on_resubscribed=self._resync_all, local_users=lambda: list(self.by_user),
        )
        await self.fanout.start()
        self.spawn(self._reconcile_presence())

    async def stop(self) -> None:
        if self._writer_task:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            await self.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.fanout.stop()
        await self.storage.close()

    async def drain(self) -> None:
        """Stop taking sends, finish in-flight commits, ask every client to reconnect."""
        self.draining = True
        self.metrics.draining.set(1)
        deadline = self.settings.drain_seconds
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.writer.flushed(), deadline)
        conns = [c for cs in self.by_user.values() for c in cs]
        log.info("draining: closing %d connections with %d", len(conns), CloseCode.RECONNECT)
        left = max(0.5, deadline - (time.monotonic() - started))
        closes = [
            c.ws.close(code=CloseCode.RECONNECT, message=b"server draining: reconnect")
            for c in conns
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closes, return_exceptions=True), left)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections ----------------------------------------------------------------------------

    def register(self, conn: Conn) -> None:
        conns = self.by_user.setdefault(conn.user, [])
        conns.append(conn)
        self.metrics.connections.inc()
        if len(conns) == 1:
            self._presence_changed(conn.user, True)

    def unregister(self, conn: Conn) -> None:
        conn.expiry.cancel()
        self.metrics.connections.dec()
        conns = self.by_user.get(conn.user, [])
        if conn in conns:
            conns.remove(conn)
        if not conns:
            self.by_user.pop(conn.user, None)
            self._presence_changed(conn.user, False)
        for user in conn.watching or ():
            watchers = self.watchers.get(user)
            if watchers is not None:
                watchers.discard(conn)
                if not watchers:
                    del self.watchers[user]
                    self.last_presence.pop(user, None)

    def _presence_changed(self, user: int, online: bool) -> None:
        self._notify_presence(user, online)
        if not self.draining or not online:
            self.spawn(self.fanout.set_online(user, online))

    async def _reconcile_presence(self) -> None:
        """Presence keys of a dead node expire without any event: poll watched users and
        push the changes (this also repairs events lost while Redis was away)."""
        while True:
            await asyncio.sleep(self.settings.presence_ttl_s / 3)
            watched = list(self.watchers)
            if not watched:
                continue
            try:
                states = await self.fanout.online(watched)
            except Exception as exc:  # Redis down: try again next round
                log.debug("presence poll failed: %r", exc)
                continue
            for user, online in states.items():
                if self.last_presence.get(user) not in (None, online):
                    self._notify_presence(user, online)
                self.last_presence[user] = online

    def _notify_presence(self, user: int, online: bool) -> None:
        if user in self.last_presence:
            self.last_presence[user] = online
        watchers = self.watchers.get(user)
        if watchers:
            frame = encode({"type": "presence", "user": user, "online": online})
            for conn in watchers:
                conn.send(frame)

    def deliver(self, users: Iterable[int], skip_device: int, frame: bytes) -> None:
        """Send an encoded frame to every local device of ``users`` except ``skip_device``."""
        by_user = self.by_user
        for user in users:
            for conn in by_user.get(user, ()):
                if conn.device != skip_device:
                    conn.send(frame)

    def broadcast(self, users: Sequence[int], frame: bytes, skip_device: int = 0) -> None:
        """Deliver here and publish to the other nodes."""
        self.deliver(users, skip_device, frame)
        self.fanout.publish([(",".join(map(str, users)), str(skip_device), frame)])

    def kick(self, user: int, device: int = 0) -> None:
        self._kick_local(user, device)
        self.fanout.publish([(KICK, f"{user},{device}", b"{}")])

    def _kick_local(self, user: int, device: int) -> None:
        for conn in list(self.by_user.get(user, ())):
            if device in (0, conn.device):
                conn.close(CloseCode.REVOKED, "session revoked")

    def _remote(self, records: list[Record]) -> None:
        for users, extra, frame in records:
            if users[0] != "!":
                self.deliver(map(int, users.split(",")), int(extra), frame)
            elif users == KICK:
                user, device = map(int, extra.split(","))
                self._kick_local(user, device)
            elif users == RESYNC:
                self._resync_all()
            elif users == PRESENCE:
                user, online = map(int, extra.split(","))
                self._notify_presence(user, bool(online))

    def _resync_all(self) -> None:
        """Pub/sub may have dropped messages: every local client syncs from PostgreSQL."""
        frame = encode({"type": "resync"})
        for conns in self.by_user.values():
            for conn in conns:
                conn.send(frame)

    # -- messaging ------------------------------------------------------------------------------

    def handle(self, conn: Conn, raw: str | bytes) -> None:
        conn.frames_in += 1
        now = time.monotonic()
        if not conn.limiter.allow(now):
            self.metrics.errors.labels("rate_limited").inc()
            if conn.limiter.strikes > MAX_STRIKES:
                conn.close(CloseCode.POLICY, "rate limit exceeded")
            elif conn.limiter.strikes == 1:
                conn.send(
                    ProtocolError(ErrorCode.RATE_LIMITED, "slow down: frame dropped").frame()
                )
            return
        try:
            frame = parse_frame(raw)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.code).inc()
            self.metrics.frames_in.labels("invalid").inc()
            conn.send(exc.frame())
            return
        kind = frame.type
        counter = self.metrics.frames_in_by_type.get(kind)
        if counter is None:
            counter = self.metrics.frames_in_by_type[kind] = self.metrics.frames_in.labels(kind)
        counter.inc()
        if kind == "send":
            if self.draining:
                conn.send(ProtocolError(ErrorCode.DRAINING, "node draining: reconnect and retry",
                                        frame.cid).frame())
                return
            self.writer.submit(Send(frame.conv, conn.user, conn.device, frame.cid, frame.body,
                                    conn, now))
        elif kind == "ping":
            conn.send(encode({"type": "pong", "ref": frame.ref}))
        else:
            self.spawn(self._guarded(conn, frame))

    async def _guarded(self, conn: Conn, frame: Frame) -> None:
        try:
            if frame.type == "sync":
                await self._sync(conn, frame)
            elif frame.type == "received":
                if not await self.storage.set_received(conn.device, frame.conv, frame.seq,
                                                       conn.user):
                    raise ProtocolError(ErrorCode.NOT_MEMBER, "not a member", frame.ref)
            elif frame.type == "read":
                members = await self.storage.set_read(frame.conv, conn.user, frame.seq)
                if members is None:
                    raise ProtocolError(ErrorCode.NOT_MEMBER, "not a member", frame.ref)
                self.broadcast(members, encode(
                    {"type": "read", "conv": frame.conv, "user": conn.user, "seq": frame.seq}))
            elif frame.type == "typing":
                try:
                    members = await self.storage.members_if_member(frame.conv, conn.user)
                except Forbidden:
                    raise ProtocolError(ErrorCode.NOT_MEMBER, "not a member", frame.ref) from None
                others = [m for m in members if m != conn.user]
                self.broadcast(others, encode(
                    {"type": "typing", "conv": frame.conv, "user": conn.user}))
            elif frame.type == "presence":
                await self._watch(conn, frame)
            elif frame.type == "auth":
                await self._reauth(conn, frame)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.code).inc()
            conn.send(exc.frame())
        except (OSError, TimeoutError) as exc:
            self._unavailable(conn, frame, exc)
        except Exception as exc:  # asyncpg/redis errors: tell the client, keep serving
            if type(exc).__module__.split(".")[0] in ("asyncpg", "redis"):
                self._unavailable(conn, frame, exc)
            else:
                log.exception("error handling %s frame", frame.type)
                self.metrics.errors.labels(ErrorCode.INTERNAL).inc()
                conn.send(ProtocolError(ErrorCode.INTERNAL, "internal error", frame.ref).frame())

    def _unavailable(self, conn: Conn, frame: Frame, exc: BaseException) -> None:
        self.metrics.errors.labels(ErrorCode.UNAVAILABLE).inc()
        conn.send(ProtocolError(ErrorCode.UNAVAILABLE,
                                f"storage unavailable ({type(exc).__name__}): retry",
                                frame.ref).frame())

    async def _reauth(self, conn: Conn, frame: Frame) -> None:
        """A newer access token of the same device extends the socket's life in place."""
        try:
            claims = self.tokens.verify(frame.token)
        except TokenError as exc:
            raise ProtocolError(exc.code, str(exc), frame.ref) from None
        if (claims.user, claims.device) != (conn.user, conn.device):
            raise ProtocolError(ErrorCode.TOKEN_INVALID, "token of another device", frame.ref)
        if not await self.storage.device_active(claims.user, claims.device):
            conn.close(CloseCode.REVOKED, "session revoked")
            return
        conn.expire_at(claims.expires)
        conn.send(encode({"type": "auth_ok", "ref": frame.ref, "expires": claims.expires}))

    async def _watch(self, conn: Conn, frame: Frame) -> None:
        users = frame.users or []
        if conn.watching is None:
            conn.watching = set()
        for user in users:
            conn.watching.add(user)
            self.watchers.setdefault(user, set()).add(conn)
        states = await self.fanout.online(users)
        self.last_presence.update(states)
        conn.send(encode({"type": "presence_state", "ref": frame.ref,
                          "online": {str(u): v for u, v in states.items()}}))

    async def _sync(self, conn: Conn, frame: Frame) -> None:
        started = time.perf_counter()
        given = frame.positions or {}
        state = await self.storage.sync_state(conn.user, conn.device)
        more: list[int] = []
        heads: dict[str, int] = {}
        starts: dict[str, int] = {}
        for conv, last_seq, stored in state:
            heads[str(conv)] = last_seq
            pos = starts[str(conv)] = given.get(conv, stored)
            if last_seq <= pos:
                continue
            rows = await self.storage.messages_after(conv, pos, SYNC_LIMIT)
            for row in rows:
                conn.send(_message(conv, row))
            if rows and rows[-1]["seq"] < last_seq:
                more.append(conv)
        self.metrics.db.labels("sync").observe(time.perf_counter() - started)
        conn.send(encode({"type": "synced", "ref": frame.ref, "heads": heads, "from": starts,
                          "more": more}))

    def _committed(self, batch: list[Send]) -> None:
        """Writer callback, in commit order: ack each send, then fan out once per message."""
        now = time.monotonic()
        records: list[Record] = []
        observe = self.metrics.send_ack.observe
        for item in batch:
            conn: Conn = item.origin
            if item.error:
                self.metrics.errors.labels(item.error).inc()
                conn.send(ProtocolError(item.error, _SEND_ERRORS[item.error], item.cid).frame())
                continue
            conn.send(b'{"type":"ack","cid":%s,"conv":%d,"seq":%d,"ts":%d}'
                      % (orjson.dumps(item.cid), item.conv, item.seq, item.ts))
            observe(now - item.started)
            frame = message_frame(item.conv, item.seq, item.sender, item.device, item.cid,
                                  item.ts, item.body)
            self.deliver(item.members, item.device, frame)
            records.append((",".join(map(str, item.members)), str(item.device), frame))
        if records:
            self.fanout.publish(records)


def _message(conv: int, row: Any) -> bytes:
    return message_frame(conv, row["seq"], row["sender_id"], row["device_id"],
                         row["client_msg_id"], row["ts"], row["body"].encode())


_SEND_ERRORS = {
    ErrorCode.NOT_MEMBER: "not a member of this conversation",
    ErrorCode.UNAVAILABLE: "message not stored (database unavailable): retry with the same cid",
}


# -- HTTP -------------------------------------------------------------------------------------


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip()
    return request.query.get("token", "")


def _claims(request: web.Request) -> Claims:
    token = _bearer(request)
    if not token:
        raise ApiError(401, "token_missing", "send 'Authorization: Bearer <access token>'")
    try:
        return request.app[NODE].tokens.verify(token)
    except TokenError as exc:
        raise ApiError(401, exc.code, str(exc)) from None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_json", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "request body must be a JSON object")
    return data


def _field(data: dict[str, Any], key: str, kind: type, *, max_len: int = 0) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ApiError(400, "bad_request", f"{key!r} must be a {kind.__name__}")
    if max_len and isinstance(value, str | list) and not 0 < len(value) <= max_len:
        raise ApiError(400, "bad_request", f"{key!r} must have 1..{max_len} items/chars")
    return value


def _user_ids(data: dict[str, Any], key: str) -> list[int]:
    ids = _field(data, key, list, max_len=1000)
    if not all(type(i) is int and i > 0 for i in ids):
        raise ApiError(400, "bad_request", f"{key!r} must be a list of user ids")
    return ids


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[NODE].metrics
    try:
        return await handler(request)
    except ApiError as exc:
        metrics.errors.labels("http_" + exc.code).inc()
        return _error(exc.status, exc.code, exc.message)
    except NotFound as exc:
        return _error(404, "not_found", str(exc))
    except Conflict as exc:
        return _error(409, "conflict", str(exc))
    except Forbidden as exc:
        metrics.errors.labels("http_not_member").inc()
        return _error(403, "not_member", str(exc))
    except web.HTTPException:
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("asyncpg", "redis") or isinstance(
            exc, OSError | TimeoutError
        ):
            metrics.errors.labels("http_unavailable").inc()
            return _error(503, "unavailable", f"storage unavailable ({type(exc).__name__})")
        log.exception("error in %s %s", request.method, request.path)
        metrics.errors.labels("http_internal").inc()
        return _error(500, "internal", "internal error")


USERNAME_MAX = 64
PASSWORD_MIN = 8


def _credentials(data: dict[str, Any]) -> tuple[str, str]:
    username = _field(data, "username", str, max_len=USERNAME_MAX)
    password = _field(data, "password", str, max_len=1024)
    if not username.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ApiError(400, "bad_request", "username may hold letters, digits, '.', '_', '-'")
    return username, password


async def _create_user(node: Node, data: dict[str, Any]) -> web.Response:
    username, password = _credentials(data)
    if len(password) < PASSWORD_MIN:
        raise ApiError(400, "bad_request", f"password must have at least {PASSWORD_MIN} chars")
    loop = asyncio.get_running_loop()
    pw_hash = await loop.run_in_executor(None, node.passwords.hash, password)
    uid = await node.storage.create_user(username, pw_hash)
    return _json({"id": uid, "username": username}, 201)


def _admin(request: web.Request) -> Node:
    node = request.app[NODE]
    if not hmac.compare_digest(_bearer(request).encode(), node.settings.admin_token.encode()):
        raise ApiError(
            401, "admin_token_invalid", "admin API needs 'Authorization: Bearer <IM_ADMIN_TOKEN>'"
        )
    return node


async def admin_create_user(request: web.Request) -> web.Response:
    node = _admin(request)
    return await _create_user(node, await _body(request))


async def admin_list_users(request: web.Request) -> web.Response:
    node = _admin(request)
    return _json({"users": await node.storage.list_users()})


async def admin_disable_user(request: web.Request) -> web.Response:
    node = _admin(request)
    retired = await node.storage.disable_user(request.match_info["username"])
    return _retired(node, "disabled", retired)


async def admin_delete_user(request: web.Request) -> web.Response:
    node = _admin(request)
    retired = await node.storage.delete_user(request.match_info["username"])
    return _retired(node, "deleted", retired)


def _retired(node: Node, how: str, retired: tuple[int, list[int]]) -> web.Response:
    """Disabled or deleted: either way every device is signed out and its sockets close."""
    uid, devices = retired
    node.kick(uid)
    return _json({"id": uid, how: True, "revoked_devices": len(devices)})


async def admin_enable_user(request: web.Request) -> web.Response:
    node = _admin(request)
    uid = await node.storage.enable_user(request.match_info["username"])
    return _json({"id": uid, "disabled": False})


async def register(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if not node.settings.open_registration:
        raise ApiError(403, "registration_closed", "open registration is disabled")
    return await _create_user(node, await _body(request))


async def _issue(node: Node, user: int, device: int, refresh: str) -> web.Response:
    return _json({
        "access_token": node.tokens.issue(user, device),
        "refresh_token": refresh,
        "expires_in": node.tokens.ttl_s,
        "user_id": user,
        "device_id": device,
    })


async def login(request: web.Request) -> web.Response:
    node = request.app[NODE]
    data = await _body(request)
    username, password = _credentials(data)
    device_name = data.get("device_name", "")
    if not isinstance(device_name, str) or len(device_name) > 100:
        raise ApiError(400, "bad_request", "'device_name' must be a string of <= 100 chars")
    row = await node.storage.user_for_login(username)
    loop = asyncio.get_running_loop()
    ok = await loop.run_in_executor(
        None, node.passwords.verify, row["password_hash"] if row else None, password
    )
    if not ok or row is None:
        raise ApiError(401, "bad_credentials", "unknown user or wrong password")
    if row["disabled"]:
        raise ApiError(403, "user_disabled", "this user is disabled")
    refresh = new_refresh()
    device = await node.storage.create_device(row["id"], device_name, hash_refresh(refresh))
    return await _issue(node, row["id"], device, refresh)


async def refresh(request: web.Request) -> web.Response:
    node = request.app[NODE]
    token = _field(await _body(request), "refresh_token", str, max_len=200)
    fresh = new_refresh()
    found = await node.storage.rotate_refresh(hash_refresh(token), hash_refresh(fresh))
    if found is None:
        raise ApiError(401, "refresh_invalid", "refresh token unknown or revoked: log in again")
    return await _issue(node, found[0], found[1], fresh)


async def logout(request: web.Request) -> web.Response:
    node = request.app[NODE]
    claims = _claims(request)
    await node.storage.revoke_device(claims.device)
    node.kick(claims.user, claims.device)
    return _json({"ok": True})


async def me(request: web.Request) -> web.Response:
    claims = _claims(request)
    return _json({"user_id": claims.user, "device_id": claims.device})


async def find_user(request: web.Request) -> web.Response:
    _claims(request)
    node = request.app[NODE]
    row = await node.storage.user_for_login(request.match_info["username"])
    if row is None or row["disabled"]:
        raise NotFound(f"no user {request.match_info['username']!r}")
    return _json({"id": row["id"], "username": request.match_info["username"]})


def _conv_id(request: web.Request) -> int:
    try:
        return int(request.match_info["conv"])
    except ValueError:
        raise ApiError(400, "bad_request", "conversation id must be an integer") from None


def _conv_event(node: Node, to: Sequence[int], event: str, conv: int, **extra: Any) -> None:
    node.broadcast(to, encode({"type": "conv", "event": event, "conv": conv, **extra}))


async def list_conversations(request: web.Request) -> web.Response:
    claims = _claims(request)
    return _json({"conversations": await request.app[NODE].storage.list_conversations(claims.user)})


async def create_direct(request: web.Request) -> web.Response:
    claims = _claims(request)
    node = request.app[NODE]
    other = _field(await _body(request), "user_id", int)
    conv = await node.storage.direct(claims.user, other)
    return _json({"id": conv, "kind": "direct", "members": sorted({claims.user, other})})


async def create_group(request: web.Request) -> web.Response:
    claims = _claims(request)
    node = request.app[NODE]
    data = await _body(request)
    title = _field(data, "title", str, max_len=200)
    members = _user_ids(data, "members") if "members" in data else []
    conv = await node.storage.create_group(claims.user, title, members)
    everyone = sorted({claims.user, *members})
    _conv_event(node, everyone, "created", conv, title=title, members=everyone)
    return _json({"id": conv, "kind": "group", "title": title, "members": everyone}, 201)


async def rename(request: web.Request) -> web.Response:
    claims = _claims(request)
    node = request.app[NODE]
    conv = _conv_id(request)
    title = _field(await _body(request), "title", str, max_len=200)
    members = await node.storage.rename(conv, claims.user, title)
    _conv_event(node, members, "renamed", conv, title=title, by=claims.user)
    return _json({"id": conv, "title": title})


async def add_members(request: web.Request) -> web.Response:
    claims = _claims(request)
    node = request.app[NODE]
    conv = _conv_id(request)
    ids = _user_ids(await _body(request), "user_ids")
    members = await node.storage.add_members(conv, claims.user, ids)
    _conv_event(node, members, "members_added", conv, users=ids, by=claims.user)
    return _json({"id": conv, "members": members})


async def _remove(request: web.Request, target: int) -> web.Response:
    claims = _claims(request)
    node = request.app[NODE]
    conv = _conv_id(request)
    before = await node.storage.remove_member(conv, claims.user, target)
    _conv_event(node, before, "member_removed", conv, user=target, by=claims.user)
    return _json({"id": conv, "members": [m for m in before if m != target]})


async def remove_member(request: web.Request) -> web.Response:
    try:
        target = int(request.match_info["user"])
    except ValueError:
        raise ApiError(400, "bad_request", "user id must be an integer") from None
    return await _remove(request, target)


async def leave(request: web.Request) -> web.Response:
    return await _remove(request, _claims(request).user)


async def history(request: web.Request) -> web.Response:
    claims = _claims(request)
    node = request.app[NODE]
    conv = _conv_id(request)
    try:
        after = int(request.query.get("after", "0"))
        before = int(request.query["before"]) if "before" in request.query else None
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
    except ValueError:
        raise ApiError(400, "bad_request", "after, before and limit must be integers") from None
    rows = await node.storage.history(conv, claims.user, after, limit, before)
    return web.Response(
        body=b'{"messages":[%s]}' % b",".join(_message(conv, r) for r in rows),
        content_type="application/json",
    )


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "node": request.app[NODE].settings.node_id,
                  "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    problems = []
    if node.draining:
        problems.append("draining")
    else:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(node.storage.ping(), 2)
            node.metrics.db.labels("ping").observe(time.perf_counter() - started)
        except Exception as exc:  # any failure means "not ready"
            problems.append(f"postgresql: {type(exc).__name__}")
        started = time.perf_counter()
        try:
            await node.fanout.ping()
            node.metrics.redis.labels("ping").observe(time.perf_counter() - started)
        except Exception as exc:
            problems.append(f"redis: {type(exc).__name__}")
        if not node.fanout.subscribed:
            problems.append("redis: subscription down")
    if problems:
        return _json({"status": "unavailable", "problems": problems}, 503)
    return _json({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[NODE].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def websocket(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    if node.draining:
        raise ApiError(503, "draining", "node draining: connect to another node")
    claims = _claims(request)
    try:
        active = await node.storage.device_active(claims.user, claims.device)
    except Exception as exc:
        node.metrics.errors.labels("ws_unavailable").inc()
        raise ApiError(503, "unavailable", f"storage unavailable ({type(exc).__name__})") from None
    if not active:
        raise ApiError(401, "token_revoked", "device logged out or user disabled")
    ws = web.WebSocketResponse(
        max_msg_size=node.settings.max_frame_bytes, compress=False, heartbeat=30.0, timeout=2.0
    )
    await ws.prepare(request)
    conn = Conn(node, ws, request, claims)
    node.register(conn)
    log.info("connect conn=%d user=%d device=%d peer=%s", conn.id, conn.user, conn.device,
             conn.peer)
    try:
        conn.send(encode({"type": "hello", "user": conn.user, "device": conn.device,
                          "node": node.settings.node_id,
                          "max_frame_bytes": node.settings.max_frame_bytes}))
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                node.handle(conn, msg.data)
            elif msg.type == WSMsgType.ERROR:
                node.metrics.errors.labels("ws_" + type(msg.data).__name__).inc()
    finally:
        node.unregister(conn)
        log.info("close conn=%d user=%d device=%d code=%s secs=%.1f in=%d out=%d",
                 conn.id, conn.user, conn.device, ws.close_code,
                 time.monotonic() - conn.opened, conn.frames_in, conn.frames_out)
    return ws


def build_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=1024 * 1024)
    app[NODE] = node
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/ws", websocket)
    r.add_post("/api/register", register)
    r.add_post("/api/login", login)
    r.add_post("/api/refresh", refresh)
    r.add_post("/api/logout", logout)
    r.add_get("/api/me", me)
    r.add_get("/api/users/{username}", find_user)
    r.add_get("/api/admin/users", admin_list_users)
    r.add_post("/api/admin/users", admin_create_user)
    r.add_post("/api/admin/users/{username}/disable", admin_disable_user)
    r.add_post("/api/admin/users/{username}/enable", admin_enable_user)
    r.add_delete("/api/admin/users/{username}", admin_delete_user)
    r.add_get("/api/conversations", list_conversations)
    r.add_post("/api/conversations/direct", create_direct)
    r.add_post("/api/conversations/group", create_group)
    r.add_patch("/api/conversations/{conv}", rename)
    r.add_post("/api/conversations/{conv}/members", add_members)
    r.add_delete("/api/conversations/{conv}/members/{user}", remove_member)
    r.add_post("/api/conversations/{conv}/leave", leave)
    r.add_get("/api/conversations/{conv}/messages", history)
    return app


async def serve(settings: Settings, ready: Callable[[int], None] | None = None) -> None:
    """Run one node until SIGTERM/SIGINT, then drain and stop."""
    node = Node(settings)
    await node.start()
    app = build_app(node)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=4096)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    log.info("node %s listening on %s:%d", settings.node_id, settings.host, port)
    if ready:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (up to %.0fs)", settings.drain_seconds)
    await node.drain()
    await site.stop()
    await runner.cleanup()
    await node.stop()
    log.info("stopped")
