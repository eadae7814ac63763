"""The drill's IM load and what it measures.

:class:`Load` creates two temporary users (deleted at the end), a sender and a
receiver device in one direct conversation, and sends at a fixed rate (open
loop: message ``n`` goes out at ``n / rate`` s whatever happened to the ones
before). Retry policy: each message keeps its client id (``cid``) and is tried
until acked, one attempt at a time, each attempt waiting at most
:data:`ATTEMPT_TIMEOUT_S` for its ack, :data:`RETRY_PAUSE_S` between attempts,
until :data:`MESSAGE_DEADLINE_S` after its first send; the server stores a cid
once, so a retry never makes a second message.

Both devices ping every :data:`PING_INTERVAL_S`; one that misses
:data:`STALE_PINGS` pings in a row is replaced by a new connection with the same
tokens and receive positions, tried once a second (each try bounded by
:data:`CONNECT_TIMEOUT_S`) until one works. That is what a client's heartbeat
does: im_server.client reconnects only when its socket closes, and a socket
through a host that vanished without a reset would wait for TCP to give up.

Everything is recorded in a :class:`Timeline` (seconds since the load started);
:func:`measure` turns it into the drill's figures and is pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets as pysecrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import aiohttp

from im_server.client import AdminClient, Client, ImError
from im_server.protocol import SeqTracker

__all__ = [
    "Attempt",
    "Delivery",
    "Endpoint",
    "Figures",
    "Load",
    "Reconnect",
    "Timeline",
    "measure",
    "percentile",
]

ATTEMPT_TIMEOUT_S = 2.0
RETRY_PAUSE_S = 0.2
MESSAGE_DEADLINE_S = 60.0
PING_INTERVAL_S = 1.0
STALE_PINGS = 2
CONNECT_TIMEOUT_S = 10.0
#: Connections a device may open to land on the wanted app node (nginx picks the node),
#: one every PLACEMENT_PAUSE_S: long enough to outlast nginx's fail_timeout for a node
#: that has just come back.
PLACEMENT_ATTEMPTS = 30
PLACEMENT_PAUSE_S = 0.5
#: Upper bounds of the end phase: in-flight sends finishing, the receiver catching up.
DRAIN_TIMEOUT_S = 20.0
CATCH_UP_TIMEOUT_S = 15.0
HISTORY_PAGE = 1000
AUDIT_ATTEMPTS = 4
AUDIT_PAUSE_S = 2.0


@dataclass(frozen=True)
class Endpoint:
    """Where the devices connect: ``urls[0]``, the others on reconnect (for a load balancer
    that is one URL), with the TLS trust and name to check."""

    urls: tuple[str, ...]
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None

    def client_options(self) -> dict[str, Any]:
        return {
            "ssl_context": self.ssl_context,
            "server_hostname": self.server_hostname,
            "fallback_urls": self.urls[1:],
        }


@dataclass(frozen=True)
class Attempt:
    """One try of one message: sent at ``sent``, answered or given up at ``done``."""

    n: int
    sent: float
    done: float
    ok: bool
    node: str  # the sender's node when it ended
    error: str = ""


@dataclass(frozen=True)
class Delivery:
    n: int
    seq: int
    at: float


@dataclass(frozen=True)
class Reconnect:
    at: float
    device: str  # sender | receiver
    node: str
    replaced: bool  # a new connection after missed pings (else the client reconnected itself)


@dataclass
class Timeline:
    attempts: list[Attempt] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    reconnects: list[Reconnect] = field(default_factory=list)
    sent: int = 0  # messages started
    acked: dict[int, int] = field(default_factory=dict)  # n -> seq
    first_sent: dict[int, float] = field(default_factory=dict)
    acked_at: dict[int, float] = field(default_factory=dict)
    # n -> seqs stored with its cid; None until the history was read after recovery
    history: dict[int, list[int]] | None = None
    marks: dict[str, float] = field(default_factory=dict)  # fault, detected, restore, ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempts": [asdict(a) for a in self.attempts],
            "deliveries": [asdict(d) for d in self.deliveries],
            "reconnects": [asdict(r) for r in self.reconnects],
            "sent": self.sent,
            "acked": {str(k): v for k, v in self.acked.items()},
            "first_sent": {str(k): v for k, v in self.first_sent.items()},
            "acked_at": {str(k): v for k, v in self.acked_at.items()},
            "history": None if self.history is None else {
                str(k): v for k, v in self.history.items()
            },
            "marks": self.marks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        return cls(
            attempts=[Attempt(**a) for a in data["attempts"]],
            deliveries=[Delivery(**d) for d in data["deliveries"]],
            reconnects=[Reconnect(**r) for r in data["reconnects"]],
            sent=data["sent"],
            acked={int(k): v for k, v in data["acked"].items()},
            first_sent={int(k): v for k, v in data["first_sent"].items()},
            acked_at={int(k): v for k, v in data["acked_at"].items()},
            history=None if data["history"] is None else {
                int(k): v for k, v in data["history"].items()
            },
            marks=dict(data["marks"]),
        )


# -- measuring (pure) -----------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Figures:
    sent: int
    acked: int
    delivered: int  # distinct messages the receiver got
    acked_lost: int | None  # acked, but not in the server's history (None: history unread)
    undelivered: int  # acked, never reached the receiver
    duplicates: int  # extra copies the receiver got (or the history holds) of one message
    reordered: int  # deliveries with a lower seq than one delivered before them
    failed_attempts: int  # attempts (after the fault) that got no ack
    first_failure_s: float | None  # when the first such attempt was sent
    recovered_s: float | None  # ack of the first attempt sent after it
    rto_s: float  # recovered - first failure (0: no attempt failed)
    p99_before_ms: float | None  # per-message send latency (first send -> ack), before the fault
    p99_fault_ms: float | None  # ... of messages first sent from the fault to restore + tail
    p50_fault_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(timeline: Timeline, fault_at: float, window_end: float) -> Figures:
    """The figures of a run whose fault came at ``fault_at``; ``window_end`` closes the
    span "around the fault" (the restore plus a tail)."""
    failures = [a for a in timeline.attempts if not a.ok and a.done >= fault_at]
    first_failure = min((a.sent for a in failures), default=None)
    recovered = None
    if first_failure is not None:
        recovered = min(
            (a.done for a in timeline.attempts if a.ok and a.sent > first_failure), default=None
        )
    if first_failure is None:
        rto = 0.0
    elif recovered is None:
        rto = math.inf
    else:
        rto = recovered - first_failure
    latency = {
        n: timeline.acked_at[n] - timeline.first_sent[n]
        for n in timeline.acked_at
        if n in timeline.first_sent
    }
    before = [v * 1000 for n, v in latency.items() if timeline.first_sent[n] < fault_at]
    around = [
        v * 1000 for n, v in latency.items() if fault_at <= timeline.first_sent[n] <= window_end
    ]
    received: dict[int, int] = {}
    reordered = 0
    top = 0
    for d in timeline.deliveries:
        received[d.n] = received.get(d.n, 0) + 1
        if d.seq < top:
            reordered += 1
        top = max(top, d.seq)
    stored = timeline.history
    duplicates = sum(c - 1 for c in received.values()) + sum(
        len(seqs) - 1 for seqs in (stored or {}).values() if len(seqs) > 1
    )
    return Figures(
        sent=timeline.sent,
        acked=len(timeline.acked),
        delivered=len(received),
        acked_lost=None if stored is None else sum(1 for n in timeline.acked if n not in stored),
        undelivered=sum(1 for n in timeline.acked if n not in received),
        duplicates=duplicates,
        reordered=reordered,
        failed_attempts=len(failures),
        first_failure_s=first_failure,
        recovered_s=recovered,
        rto_s=rto,
        p99_before_ms=percentile(before, 99),
        p99_fault_ms=percentile(around, 99),
        p50_fault_ms=percentile(around, 50),
    )


# -- the load -------------------------------------------------------------------------


class Load:
    """Two drill users and their devices; ``async with`` creates and deletes them.

    Args:
        endpoint: where to connect.
        admin_token: the IM server's admin token (creates and deletes the users).
        label: goes into the message cids and bodies (one per drill).
    """

    def __init__(self, endpoint: Endpoint, admin_token: str, label: str) -> None:
        self.endpoint = endpoint
        self.admin_token = admin_token
        self.label = label
        suffix = pysecrets.token_hex(3)
        self.names = (f"imcloud-drill-{suffix}-tx", f"imcloud-drill-{suffix}-rx")
        self.password = pysecrets.token_urlsafe(18)
        self.timeline = Timeline()
        self.sender: Client | None = None
        self.receiver: Client | None = None
        self.conv = 0
        self._t0 = time.monotonic()
        self._created: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: list[Client] = []
        self._stopping = asyncio.Event()
        self._on_attempt: Callable[[Attempt], None] | None = None
        self._opened = 0

    def now(self) -> float:
        return time.monotonic() - self._t0

    # -- set-up and tear-down ---------------------------------------------------------

    async def __aenter__(self) -> Load:
        opts = self.endpoint.client_options()
        try:
            for name in self.names:
                await self._admin(
                    partial(AdminClient.create_user, username=name, password=self.password)
                )
                self._created.append(name)
            self.sender = await Client.login(self.endpoint.urls[0], self.names[0],
                                             self.password, device_name="drill", **opts)
            self.receiver = await Client.login(self.endpoint.urls[0], self.names[1],
                                               self.password, device_name="drill", **opts)
            await asyncio.wait_for(self.sender.connect(), CONNECT_TIMEOUT_S)
            await asyncio.wait_for(self.receiver.connect(), CONNECT_TIMEOUT_S)
            self.conv = await self.sender.direct(self.receiver.user_id)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)
        for client in (self.sender, self.receiver, *self._retired):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 5)
        for name in self._created:
            with contextlib.suppress(ImError, aiohttp.ClientError, OSError, TimeoutError):
                await self._admin(partial(AdminClient.delete_user, username=name))

    async def _admin(self, call: Callable[[AdminClient], Awaitable[Any]]) -> Any:
        """An admin API call through the first of the endpoint's URLs that answers."""
        last: Exception | None = None
        for url in self.endpoint.urls:
            async with AdminClient(url, self.admin_token, ssl_context=self.endpoint.ssl_context,
                                   server_hostname=self.endpoint.server_hostname) as admin:
                try:
                    return await asyncio.wait_for(call(admin), 15)
                except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
                    last = exc
        assert last is not None
        raise last

    async def place(self, sender_on: str | None, receiver_off: str | None) -> tuple[str, str]:
        """Reconnect the devices (bounded) until the sender is on ``sender_on`` (if given) and
        the receiver is not on ``receiver_off`` (if given); returns their nodes."""
        assert self.sender is not None and self.receiver is not None
        for _ in range(PLACEMENT_ATTEMPTS):
            if sender_on is None or self.sender.node == sender_on:
                break
            await asyncio.sleep(PLACEMENT_PAUSE_S)
            self.sender = await self._reopen(self.sender)
        for _ in range(PLACEMENT_ATTEMPTS):
            if receiver_off is None or self.receiver.node != receiver_off:
                break
            await asyncio.sleep(PLACEMENT_PAUSE_S)
            self.receiver = await self._reopen(self.receiver)
        return self.sender.node, self.receiver.node

    async def _reopen(self, old: Client) -> Client:
        """A new connection of the same device (tokens, receive positions); the old one is
        closed in the background (through a dead path its close can take a while). Each new
        connection starts at the next of the endpoint's URLs."""
        self._opened += 1
        urls = self.endpoint.urls
        first = self._opened % len(urls)
        options = self.endpoint.client_options()
        options["fallback_urls"] = urls[first + 1 :] + urls[:first]
        new = Client(urls[first], old.access_token, refresh_token=old.refresh_token,
                     user_id=old.user_id, device_id=old.device_id, **options)
        new.tracker = SeqTracker(old.tracker.positions())
        try:
            await asyncio.wait_for(new.connect(), CONNECT_TIMEOUT_S)
        except BaseException:
            self._spawn(self._close_quietly(new))
            raise
        self._retired.append(old)
        self._spawn(self._close_quietly(old))
        return new

    @staticmethod
    async def _close_quietly(client: Client) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 15)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- running ----------------------------------------------------------------------

    async def run(self, rate: float, stop: asyncio.Event,
                  on_attempt: Callable[[Attempt], None] | None = None) -> None:
        """Send ``rate`` messages per second until ``stop`` is set, then wait (bounded) for
        the messages in flight. Devices are watched and replaced meanwhile."""
        self._t0 = time.monotonic()
        self._on_attempt = on_attempt
        watchers = [self._spawn(self._watch("sender")), self._spawn(self._watch("receiver"))]
        reader = self._spawn(self._read(self._receiver()))
        messages: list[asyncio.Task[Any]] = []
        n = 0
        while not stop.is_set():
            due = self._t0 + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            messages.append(self._spawn(self._message(n)))
            n += 1
        pending = [t for t in messages if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await self._catch_up()
        for task in (*watchers, reader):
            task.cancel()

    def _receiver(self) -> Client:
        assert self.receiver is not None
        return self.receiver

    async def _message(self, n: int) -> None:
        timeline = self.timeline
        cid = f"{self.label}-{n}"
        timeline.sent += 1
        started = self.now()
        timeline.first_sent[n] = started
        while not self._stopping.is_set():
            sender = self.sender
            assert sender is not None
            sent = self.now()
            error = ""
            try:
                ack = await asyncio.wait_for(
                    sender.send(self.conv, {"drill": self.label, "n": n}, cid=cid,
                                timeout=ATTEMPT_TIMEOUT_S, attempts=1),
                    ATTEMPT_TIMEOUT_S + 1,
                )
            except (ImError, TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = getattr(exc, "code", "") or type(exc).__name__
            attempt = Attempt(n, sent, self.now(), not error, sender.node, error)
            timeline.attempts.append(attempt)
            if self._on_attempt is not None:
                self._on_attempt(attempt)
            if not error:
                timeline.acked[n] = ack.seq
                timeline.acked_at[n] = attempt.done
                return
            if self.now() - started > MESSAGE_DEADLINE_S:
                return
            await asyncio.sleep(RETRY_PAUSE_S)

    async def _read(self, client: Client) -> None:
        async for message in client.messages():
            if isinstance(message.body, dict) and message.body.get("drill") == self.label:
                self.timeline.deliveries.append(
                    Delivery(int(message.body["n"]), message.seq, self.now())
                )

    async def _watch(self, device: str) -> None:
        """Ping the device; after STALE_PINGS misses in a row open new connections (one per
        PING_INTERVAL_S) until one works; record node changes (the client's own reconnects
        and ours)."""
        misses = 0
        node = getattr(self, device).node
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            client = getattr(self, device)
            if misses < STALE_PINGS:
                try:
                    await asyncio.wait_for(client.ping(ATTEMPT_TIMEOUT_S), ATTEMPT_TIMEOUT_S + 0.5)
                    misses = 0
                except Exception:  # any failure is a missed ping; the heartbeat must go on
                    misses += 1
                if client.node != node:
                    node = client.node
                    self.timeline.reconnects.append(Reconnect(self.now(), device, node, False))
                continue
            try:
                new = await self._reopen(client)
            except Exception:  # e.g. a socket closed before its hello: try again
                continue
            setattr(self, device, new)
            misses = 0
            node = new.node
            self.timeline.reconnects.append(Reconnect(self.now(), device, node, True))
            if device == "receiver":
                self._spawn(self._read(new))

    async def _catch_up(self) -> None:
        """Give the receiver (bounded) time to get every acked message, syncing meanwhile."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            got = {d.n for d in self.timeline.deliveries}
            if all(n in got for n in self.timeline.acked):
                return
            with contextlib.suppress(ImError, TimeoutError, aiohttp.ClientError, OSError):
                await asyncio.wait_for(self._receiver().sync(5), 6)
            await asyncio.sleep(0.5)

    async def audit(self) -> None:
        """Read the conversation's whole history into ``timeline.history`` (which drill
        message is stored under which seqs): up to AUDIT_ATTEMPTS tries, each through a
        fresh connection and each of the endpoint's URLs in turn. Raises the last error."""
        assert self.sender is not None
        last: Exception | None = None
        for attempt in range(AUDIT_ATTEMPTS):
            url = self.endpoint.urls[attempt % len(self.endpoint.urls)]
            reader = Client(url, self.sender.access_token, refresh_token=self.sender.refresh_token,
                            reconnect=False, **self.endpoint.client_options())
            try:
                self.timeline.history = await self._history(reader)
                return
            except (ImError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = exc
            finally:
                await reader.close()
            await asyncio.sleep(AUDIT_PAUSE_S)
        assert last is not None
        raise last

    async def _history(self, reader: Client) -> dict[int, list[int]]:
        stored: dict[int, list[int]] = {}
        after = 0
        while True:
            page = await reader.history(self.conv, after=after, limit=HISTORY_PAGE)
            for message in page:
                if message.cid.startswith(f"{self.label}-"):
                    stored.setdefault(int(message.cid.rsplit("-", 1)[1]), []).append(message.seq)
            if len(page) < HISTORY_PAGE:
                return stored
            after = page[-1].seq
