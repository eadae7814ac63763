"""Asyncio client for the IM server: HTTP API, admin API and one WebSocket per device.

Typical use::

    async with AdminClient("https://chat.example.com", admin_token) as admin:
        await admin.create_user("alice", "correct horse")
    alice = await Client.login("https://chat.example.com", "alice", "correct horse")
    await alice.connect()
    conv = await alice.direct(await alice.user_id_of("bob"))
    ack = await alice.send(conv, {"text": "hi"})       # waits for the ack (seq)
    async for msg in bob.messages():                     # deduplicated, in seq order
        ...
    await alice.close()

``ssl_context`` and ``server_hostname`` let a caller reach ``https://<lb ip>`` with
the cloud's CA while verifying the certificate for the cloud's domain name. The
wire protocol is described in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import orjson

from .protocol import CloseCode, SeqTracker

__all__ = ["AdminClient", "Ack", "Client", "ImError", "Message"]

_RETRY_CODES = {"unavailable", "draining", "rate_limited"}
_FATAL_CLOSE = {CloseCode.REVOKED, CloseCode.POLICY}


class ImError(Exception):
    """An error answer from the server; ``code`` is its machine-readable code."""

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Message:
    conv: int
    seq: int
    sender: int
    device: int
    cid: str
    ts: int
    body: Any


@dataclass(frozen=True, slots=True)
class Ack:
    conv: int
    seq: int
    cid: str
    ts: int


def _message(frame: dict[str, Any]) -> Message:
    return Message(frame["conv"], frame["seq"], frame["from"], frame["device"], frame["cid"],
                   frame["ts"], frame["body"])


class _Http:
    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None,
                 server_hostname: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.server_hostname = server_hostname
        self.headers = {"Host": server_hostname} if server_hostname else {}
        self.session = aiohttp.ClientSession(
            json_serialize=lambda o: orjson.dumps(o).decode(),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    def _kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"headers": dict(self.headers)}
        if self.base_url.startswith(("https", "wss")):
            kw["ssl"] = self.ssl
            if self.server_hostname:
                kw["server_hostname"] = self.server_hostname
        return kw

    async def call(self, method: str, path: str, token: str | None = None,
                   body: Any = None, params: dict[str, Any] | None = None) -> Any:
        kw = self._kw()
        if token:
            kw["headers"]["Authorization"] = f"Bearer {token}"
        if body is not None:
            kw["json"] = body
        async with self.session.request(method, self.base_url + path, params=params,
                                        **kw) as resp:
            data = await resp.read()
            try:
                parsed = orjson.loads(data) if data else None
            except orjson.JSONDecodeError:
                parsed = None
            if resp.status >= 400:
                err = parsed if isinstance(parsed, dict) else {}
                raise ImError(err.get("error", f"http_{resp.status}"),
                              err.get("message", data[:200].decode(errors="replace")),
                              resp.status)
            return parsed

    async def close(self) -> None:
        await self.session.close()


class AdminClient:
    """The admin API (``Authorization: Bearer <IM_ADMIN_TOKEN>``)."""

    def __init__(self, base_url: str, admin_token: str, *,
                 ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        self._http = _Http(base_url, ssl_context, server_hostname)
        self._token = admin_token

    async def create_user(self, username: str, password: str) -> dict[str, Any]:
        """Create a user; returns ``{"id", "username"}``. ImError ``conflict`` if it exists."""
        return await self._http.call("POST", "/api/admin/users", self._token,
                                     {"username": username, "password": password})

    async def list_users(self) -> list[dict[str, Any]]:
        """All users: ``[{"id", "username", "disabled", "created_at"}]``."""
        return (await self._http.call("GET", "/api/admin/users", self._token))["users"]

    async def disable_user(self, username: str) -> dict[str, Any]:
        """Disable a user, revoke their tokens and disconnect their devices."""
        return await self._http.call("POST", f"/api/admin/users/{username}/disable",
                                     self._token)

    async def enable_user(self, username: str) -> dict[str, Any]:
        """Re-enable a disabled user; they log in again (old devices stay signed out)."""
        return await self._http.call("POST", f"/api/admin/users/{username}/enable",
                                     self._token)

    async def delete_user(self, username: str) -> dict[str, Any]:
        """Delete a user: revoke their tokens, disconnect their devices, free the name.

        ImError ``not_found`` if no user (or an already deleted one) has that name.
        """
        return await self._http.call("DELETE", f"/api/admin/users/{username}", self._token)

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """One device of one user.

    Args:
        base_url: ``http(s)://host[:port]`` of a node or the load balancer.
        access_token: from :meth:`login` (or a previous session).
        refresh_token: lets the client renew an expired access token on reconnect.
        fallback_urls: other nodes to try when reconnecting.
        on_frame: called with every raw ``msg`` frame as it arrives, before dedup and
            reordering (for measurements).
        reconnect: reconnect and re-sync automatically when the socket drops (after
            close 4001, an expired access token, refresh it first).
        renew_in_place: shortly before the access token expires, refresh it and hand
            it to the open socket (an ``auth`` frame), so the socket stays open; needs
            ``refresh_token``. If that fails the socket closes with 4001 and
            ``reconnect`` takes over.
    """

    def __init__(self, base_url: str, access_token: str, *, refresh_token: str | None = None,
                 user_id: int = 0, device_id: int = 0,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 fallback_urls: Sequence[str] = (),
                 on_frame: Callable[[dict[str, Any]], None] | None = None,
                 reconnect: bool = True, renew_in_place: bool = True) -> None:
        self._http = _Http(base_url, ssl_context, server_hostname)
        self._urls = [base_url.rstrip("/"), *[u.rstrip("/") for u in fallback_urls]]
        self.access_token = access_token
        self.refresh_token = refresh_token
        self.user_id = user_id
        self.device_id = device_id
        self.node = ""
        self.tracker = SeqTracker()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self._on_frame = on_frame
        self._reconnect = reconnect
        self._renew_in_place = renew_in_place
        self._renewal: asyncio.TimerHandle | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._requests: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._gap_check: asyncio.TimerHandle | None = None
        self._closed = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._url_index = 0
        self.close_code: int | None = None

    # -- sessions ---------------------------------------------------------------------------

    @classmethod
    async def login(cls, base_url: str, username: str, password: str, *,
                    device_name: str = "", **kwargs: Any) -> Client:
        """Log in (a new device) and return a client; ``kwargs`` go to the constructor."""
        http = _Http(base_url, kwargs.get("ssl_context"), kwargs.get("server_hostname"))
        try:
            data = await http.call("POST", "/api/login", body={
                "username": username, "password": password, "device_name": device_name})
        finally:
            await http.close()
        return cls(base_url, data["access_token"], refresh_token=data["refresh_token"],
                   user_id=data["user_id"], device_id=data["device_id"], **kwargs)

    async def refresh(self) -> None:
        """Swap the refresh token for a new access + refresh token pair."""
        if not self.refresh_token:
            raise ImError("refresh_invalid", "no refresh token")
        data = await self._http.call("POST", "/api/refresh",
                                     body={"refresh_token": self.refresh_token})
        self.access_token = data["access_token"]
        self.refresh_token = data["refresh_token"]

    async def logout(self) -> None:
        """Revoke this device's tokens on the server and close."""
        await self._http.call("POST", "/api/logout", self.access_token)
        await self.close()

    # -- WebSocket --------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the WebSocket (raises ImError if the server refuses) and start reading."""
        await self._open()
        self._reader = asyncio.create_task(self._read_loop())

    async def _open(self) -> None:
        url = self._urls[self._url_index % len(self._urls)]
        ws_url = url.replace("http", "ws", 1) + "/ws"
        kw = self._http._kw()
        kw["headers"]["Authorization"] = f"Bearer {self.access_token}"
        try:
            ws = await self._http.session.ws_connect(ws_url, autoping=True, heartbeat=None,
                                                     max_msg_size=0, compress=0, **kw)
        except aiohttp.WSServerHandshakeError as exc:
            raise ImError("ws_refused", f"{exc.status} {exc.message}", exc.status) from None
        hello = orjson.loads((await ws.receive(timeout=10)).data)
        self._http.base_url = url  # HTTP calls follow the node we are connected to
        self.user_id, self.device_id, self.node = hello["user"], hello["device"], hello["node"]
        self._ws = ws
        self._connected.set()
        self._schedule_renewal()

    def _schedule_renewal(self) -> None:
        """Renew the access token over the open socket a little before it expires
        (a fifth of its life, 1-60 s, ahead)."""
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if not (self._renew_in_place and self.refresh_token) or self._closed:
            return
        try:
            claims = jwt.decode(self.access_token, options={"verify_signature": False})
            left = float(claims["exp"]) - time.time()
        except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
            return  # not a token we can read: expiry and reconnect handle it
        delay = max(0.0, left - max(1.0, min(60.0, left / 5)))
        self._renewal = asyncio.get_running_loop().call_later(
            delay, lambda: self._background(self._renew())
        )

    async def _renew(self) -> None:
        try:
            await self.refresh()
            await self._request({"type": "auth", "token": self.access_token}, 10)
        except (ImError, aiohttp.ClientError, OSError, TimeoutError):
            return  # the socket closes with 4001 at expiry and the reconnect path takes over
        self._schedule_renewal()

    async def _read_loop(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            self._background(self._quiet_sync())
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._dispatch(orjson.loads(msg.data))
            self._connected.clear()
            self.close_code = ws.close_code
            lost = ImError("unavailable", f"socket closed ({ws.close_code})")
            for fut in [*self._requests.values(), *self._pending.values()]:
                if not fut.done():
                    fut.set_exception(lost)  # sends retry with the same cid once reconnected
            if self._closed or not self._reconnect or ws.close_code in _FATAL_CLOSE:
                break
            if ws.close_code == CloseCode.TOKEN_EXPIRED and not await self._renew_for_reconnect():
                break
            if not await self._reopen():
                break
        self._inbox.put_nowait(None)

    async def _renew_for_reconnect(self) -> bool:
        """After close 4001: refresh before reconnecting; False if only a new login helps."""
        try:
            await self.refresh()
        except ImError as exc:
            if exc.code == "refresh_invalid":
                return False
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass  # node unreachable: reconnecting elsewhere refreshes on the 401
        return True

    async def _reopen(self) -> bool:
        """Reconnect (next URL first), with backoff; False when only a new login helps."""
        delay = 0.05
        while not self._closed:
            self._url_index += 1
            try:
                await self._open()
                return True
            except ImError as exc:
                if exc.code == "token_revoked" or (exc.status == 401 and (
                    not self.refresh_token or not await self._renew_for_reconnect()
                )):
                    return False
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        return False

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "msg":
            if self._on_frame:
                self._on_frame(frame)
            for item in self.tracker.offer(frame["conv"], frame["seq"], frame):
                self._inbox.put_nowait(_message(item))  # type: ignore[arg-type]
            if self.tracker.gaps() and self._gap_check is None:
                self._gap_check = asyncio.get_running_loop().call_later(0.5, self._check_gaps)
        elif kind == "ack":
            fut = self._pending.pop(frame["cid"], None)
            for item in self.tracker.advance(frame["conv"], frame["seq"]):
                self._inbox.put_nowait(_message(item))  # type: ignore[arg-type]
            if fut and not fut.done():
                fut.set_result(frame)
        elif kind == "error":
            ref = frame.get("ref")
            fut = self._pending.pop(ref, None) if isinstance(ref, str) else None
            fut = fut or (self._requests.pop(ref, None) if isinstance(ref, str) else None)
            if fut and not fut.done():
                fut.set_exception(ImError(frame["code"], frame.get("message", "")))
            else:
                self.events.put_nowait(frame)
        elif kind in ("synced", "presence_state", "pong", "auth_ok"):
            for conv, seq in (frame.get("from") or {}).items():
                for item in self.tracker.start_at(int(conv), seq):
                    self._inbox.put_nowait(_message(item))  # type: ignore[arg-type]
            fut = self._requests.pop(frame.get("ref") or "", None)
            if fut and not fut.done():
                fut.set_result(frame)
        elif kind == "resync":
            self._background(self._quiet_sync())
        elif kind != "hello":
            self.events.put_nowait(frame)

    def _check_gaps(self) -> None:
        self._gap_check = None
        if self.tracker.gaps():
            self._background(self._quiet_sync())

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quiet_sync(self) -> None:
        with contextlib.suppress(ImError, ConnectionError, TimeoutError):
            await self.sync()

    async def _request(self, frame: dict[str, Any], timeout: float) -> dict[str, Any]:
        ref = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[ref] = fut
        try:
            await self._send_frame({**frame, "ref": ref})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._requests.pop(ref, None)

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        await asyncio.wait_for(self._connected.wait(), 30)
        assert self._ws is not None
        await self._ws.send_bytes(orjson.dumps(frame))

    async def send(self, conv: int, body: Any, *, cid: str | None = None,
                   timeout: float = 5.0, attempts: int = 5) -> Ack:
        """Send a message and wait for its ack; retries with the same client id.

        A retry after a timeout, a disconnect or an ``unavailable`` error is safe: the
        server stores a client id once and acks a retry with the original seq.
        """
        cid = cid or uuid.uuid4().hex
        frame = orjson.dumps({"type": "send", "conv": conv, "cid": cid, "body": body})
        last: Exception = ImError("timeout", "no ack")
        for attempt in range(attempts):
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[cid] = fut
            try:
                await asyncio.wait_for(self._connected.wait(), timeout)
                assert self._ws is not None
                await self._ws.send_bytes(frame)
                ack = await asyncio.wait_for(fut, timeout)
                return Ack(ack["conv"], ack["seq"], cid, ack["ts"])
            except ImError as exc:
                if exc.code not in _RETRY_CODES:
                    raise
                last = exc
            except (TimeoutError, ConnectionError, aiohttp.ClientError) as exc:
                last = exc
            finally:
                self._pending.pop(cid, None)
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        raise ImError("send_failed", f"no ack after {attempts} attempts: {last}")

    async def messages(self) -> AsyncIterator[Message]:
        """Messages from others (and own other devices), once each, in seq order per conv."""
        while True:
            item = await self._inbox.get()
            if item is None:
                return
            yield item

    async def next_message(self, timeout: float = 10.0) -> Message:
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if item is None:
            raise ImError("disconnected", f"socket closed ({self.close_code})")
        return item

    async def sync(self, timeout: float = 30.0) -> dict[str, Any]:
        """Fetch everything after this client's positions (repeats while the server has more)."""
        while True:
            reply = await self._request(
                {"type": "sync", "positions": {str(k): v for k, v in
                                               self.tracker.positions().items()}}, timeout)
            if not reply["more"]:
                return reply

    async def mark_received(self) -> None:
        """Store this device's positions on the server (they seed the next sync)."""
        for conv, seq in self.tracker.positions().items():
            await self._send_frame({"type": "received", "conv": conv, "seq": seq})

    async def read(self, conv: int, seq: int) -> None:
        """Mark ``conv`` read up to ``seq``; members get a ``read`` event."""
        await self._send_frame({"type": "read", "conv": conv, "seq": seq})

    async def typing(self, conv: int) -> None:
        await self._send_frame({"type": "typing", "conv": conv})

    async def presence(self, users: Sequence[int], timeout: float = 10.0) -> dict[int, bool]:
        """Current online state of ``users``; later changes arrive as ``presence`` events."""
        reply = await self._request({"type": "presence", "users": list(users)}, timeout)
        return {int(k): v for k, v in reply["online"].items()}

    async def ping(self, timeout: float = 10.0) -> None:
        await self._request({"type": "ping"}, timeout)

    # -- HTTP API ---------------------------------------------------------------------------

    async def _api(self, method: str, path: str, body: Any = None,
                   params: dict[str, Any] | None = None) -> Any:
        try:
            return await self._http.call(method, path, self.access_token, body, params)
        except ImError as exc:
            if exc.code != "token_expired" or not self.refresh_token:
                raise
        await self.refresh()
        return await self._http.call(method, path, self.access_token, body, params)

    async def user_id_of(self, username: str) -> int:
        return (await self._api("GET", f"/api/users/{username}"))["id"]

    async def direct(self, user_id: int) -> int:
        """The id of the one-to-one conversation with ``user_id`` (created on first use)."""
        return (await self._api("POST", "/api/conversations/direct", {"user_id": user_id}))["id"]

    async def create_group(self, title: str, members: Sequence[int]) -> int:
        return (await self._api("POST", "/api/conversations/group",
                                {"title": title, "members": list(members)}))["id"]

    async def rename(self, conv: int, title: str) -> None:
        await self._api("PATCH", f"/api/conversations/{conv}", {"title": title})

    async def add_members(self, conv: int, user_ids: Sequence[int]) -> list[int]:
        return (await self._api("POST", f"/api/conversations/{conv}/members",
                                {"user_ids": list(user_ids)}))["members"]

    async def remove_member(self, conv: int, user_id: int) -> list[int]:
        return (await self._api("DELETE", f"/api/conversations/{conv}/members/{user_id}"))[
            "members"]

    async def leave(self, conv: int) -> None:
        await self._api("POST", f"/api/conversations/{conv}/leave")

    async def conversations(self) -> list[dict[str, Any]]:
        return (await self._api("GET", "/api/conversations"))["conversations"]

    async def history(self, conv: int, after: int = 0, limit: int = 100,
                      before: int | None = None) -> list[Message]:
        """Messages with ``after < seq < before``, oldest first, at most ``limit``."""
        params: dict[str, Any] = {"after": after, "limit": limit}
        if before is not None:
            params["before"] = before
        data = await self._api("GET", f"/api/conversations/{conv}/messages", params=params)
        return [_message(m) for m in data["messages"]]

    async def close(self) -> None:
        self._closed = True
        if self._renewal is not None:
            self._renewal.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 5)
        await self._http.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
