"""Load generator: ``python -m im_server.bench`` (see docs/benchmarks.md).

Open loop: message k is due at ``start + k / rate`` whatever the server does, and
both latencies are measured from that intended time, so a stalled server shows up
as latency instead of a slower schedule (no coordinated omission). Every receiver
checks exactly-once, in-order delivery per conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop

from .client import AdminClient, Client, ImError
from .localstack import Stack

__all__ = ["main"]

PASSWORD = "bench-password-1"


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Stats:
    sent: int = 0
    ack_ms: list[float] = field(default_factory=list)
    deliver_ms: list[float] = field(default_factory=list)
    acked: dict[str, tuple[int, int]] = field(default_factory=dict)  # cid -> (conv, seq)
    delivered: dict[str, int] = field(default_factory=dict)  # cid -> times delivered
    reordered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    last_delivery: float = 0.0


class _Frames(asyncio.Protocol):
    """Reads the server's frames straight off the transport and hands each text frame to
    ``on_text`` at once: no reader task, no queue, so the receive time is taken as the
    bytes arrive. Answers pings; the server never fragments or masks its frames."""

    def __init__(self, transport: asyncio.BaseTransport,
                 on_text: Callable[[bytes, float], None]) -> None:
        self.transport = transport
        self.previous = transport.get_protocol()  # aiohttp's: told when the socket closes
        self.on_text = on_text
        self.buf = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        pos, size = 0, len(buf)
        while size - pos >= 2:
            op, length, at = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, pos + 2
            if length == 126:
                length, at = int.from_bytes(buf[at:at + 2], "big"), at + 2
            elif length == 127:
                length, at = int.from_bytes(buf[at:at + 8], "big"), at + 8
            if size < at + length:
                break
            payload = bytes(buf[at:at + length])
            pos = at + length
            if op == 1:
                self.on_text(payload, now)
            elif op == 9:
                _write_frame(self.transport, payload, 0x8A)
            elif op == 8:
                self.transport.close()
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.previous.connection_lost(exc)  # else aiohttp's session.close() waits forever


def _write_frame(transport: asyncio.BaseTransport, payload: bytes, first: int = 0x81) -> None:
    """One client frame. Clients must mask; the all-zero mask key leaves the payload as it
    is, which spares the load generator the copy and XOR of every frame."""
    size = len(payload)
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = bytes((first, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + size.to_bytes(8, "big")
    transport.write(header + b"\0\0\0\0" + payload)  # type: ignore[attr-defined]


class Conn:
    """A raw, lean WebSocket for one user: the bench must not be the bottleneck.

    aiohttp does the handshake (TLS, headers, source address); then the socket's frames
    are read and written directly (:class:`_Frames`, :func:`_write_frame`).
    """

    def __init__(self, stats: Stats, base: float) -> None:
        self.stats = stats
        self.base = base
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.frames_io: _Frames | None = None
        self.intended: dict[str, float] = {}
        self.last_seq: dict[int, int] = {}
        self.waiter: asyncio.Future[None] | None = None
        self.frames: dict[str, bytes] = {}

    async def open(self, session: aiohttp.ClientSession, url: str, token: str,
                   kw: dict[str, Any]) -> None:
        ws_url = url.replace("http", "ws", 1) + "/ws"
        headers = {**kw.get("headers", {}), "Authorization": f"Bearer {token}"}
        self.ws = await session.ws_connect(ws_url, headers=headers, compress=0,
                                           max_msg_size=0, **{k: v for k, v in kw.items()
                                                              if k != "headers"})
        await self.ws.receive(timeout=30)  # hello

    def start(self) -> None:
        """From here on this object reads and writes the socket itself."""
        assert self.ws is not None
        # aiohttp does not expose the transport otherwise; tests/im_server/test_bench.py
        # notices when an aiohttp release moves it.
        transport = getattr(getattr(self.ws, "_writer", None), "transport", None)
        if transport is None:
            raise RuntimeError(f"aiohttp {aiohttp.__version__} hides the WebSocket's transport")
        self.frames_io = _Frames(transport, self._on_text)
        transport.set_protocol(self.frames_io)

    def _on_text(self, data: bytes, now: float) -> None:
        stats = self.stats
        frame = orjson.loads(data)
        kind = frame["type"]
        if kind == "msg":
            body = frame["body"]
            if not isinstance(body, dict) or "t" not in body:
                return
            cid = frame["cid"]
            count = stats.delivered.get(cid, 0)
            stats.delivered[cid] = count + 1
            if count == 0:
                stats.deliver_ms.append((now - self.base - body["t"]) * 1000)
            conv, seq = frame["conv"], frame["seq"]
            if seq < self.last_seq.get(conv, 0):
                stats.reordered += 1
            else:
                self.last_seq[conv] = seq
            stats.last_delivery = now
        elif kind == "ack":
            cid = frame["cid"]
            sent_at = self.intended.pop(cid, None)
            self.frames.pop(cid, None)
            if cid not in stats.acked and sent_at is not None:
                stats.ack_ms.append((now - sent_at) * 1000)
            stats.acked[cid] = (frame["conv"], frame["seq"])
            if self.waiter and not self.waiter.done():
                self.waiter.set_result(None)
        elif kind == "error":
            code = frame.get("code", "?")
            stats.errors[code] = stats.errors.get(code, 0) + 1
            ref = frame.get("ref")
            if code in ("unavailable", "rate_limited", "draining") and ref in self.frames:
                asyncio.get_running_loop().call_later(0.1, self._resend, ref)

    def _resend(self, cid: str) -> None:
        frame = self.frames.get(cid)
        io = self.frames_io
        if frame is not None and io is not None and not io.transport.is_closing():
            _write_frame(io.transport, frame)

    def send(self, conv: int, intended: float, n: int) -> None:
        cid = uuid.uuid4().hex
        frame = orjson.dumps({"type": "send", "conv": conv, "cid": cid,
                              "body": {"t": intended - self.base, "n": n, "pad": "x" * 40}})
        self.intended[cid] = intended
        self.frames[cid] = frame
        self.stats.sent += 1
        assert self.frames_io is not None
        _write_frame(self.frames_io.transport, frame)

    async def close(self) -> None:
        io = self.frames_io
        if io is None:
            if self.ws is not None:
                await self.ws.close()
            return
        if not io.transport.is_closing():
            _write_frame(io.transport, (1000).to_bytes(2, "big"), 0x88)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(io.closed), 5)
        io.transport.close()


class Bench:
    def __init__(self, args: argparse.Namespace, urls: Sequence[str], admin_token: str) -> None:
        self.args = args
        self.urls = list(urls)
        self.admin_token = admin_token
        self.run_id = uuid.uuid4().hex[:6]
        ctx: ssl.SSLContext | None = None
        if args.ca_file:
            ctx = ssl.create_default_context(cafile=args.ca_file)
        self.client_kw: dict[str, Any] = {"ssl_context": ctx,
                                          "server_hostname": args.server_hostname}
        self.ws_kw: dict[str, Any] = {}
        if urls[0].startswith("https"):
            self.ws_kw["ssl"] = ctx if ctx is not None else True
            if args.server_hostname:
                self.ws_kw["server_hostname"] = args.server_hostname
                self.ws_kw["headers"] = {"Host": args.server_hostname}

    async def users(self, count: int) -> list[Client]:
        """Create ``count`` users and log each in on node ``i % nodes``."""
        names = [f"bench{self.run_id}u{i}" for i in range(count)]
        sem = asyncio.Semaphore(16)

        async def create(name: str) -> None:
            async with sem:
                await admin.create_user(name, PASSWORD)

        async def login(i: int, name: str) -> Client:
            async with sem:
                return await Client.login(self.urls[i % len(self.urls)], name, PASSWORD,
                                          device_name="bench", **self.client_kw)

        started = time.monotonic()
        async with AdminClient(self.urls[0], self.admin_token, **self.client_kw) as admin:
            await asyncio.gather(*[create(n) for n in names])
        clients = list(await asyncio.gather(*[login(i, n) for i, n in enumerate(names)]))
        _say(f"{count} users created and logged in ({time.monotonic() - started:.1f}s)")
        return clients

    async def load(self) -> dict[str, Any]:
        args = self.args
        users = await self.users(args.users - args.users % 2)
        # pair 2i with 2i+1: logged in on nodes i and i+1, so with --spawn N >= 2 every
        # conversation crosses nodes
        pairs = [(users[i], users[i + 1]) for i in range(0, len(users), 2)]
        convs = await asyncio.gather(*[a.direct(b.user_id) for a, b in pairs])
        base = time.monotonic()
        stats = Stats()
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        conns: dict[int, Conn] = {}
        sem = asyncio.Semaphore(32)

        async def open_conn(c: Client) -> None:
            conn = Conn(stats, base)
            async with sem:
                await conn.open(session, c._http.base_url, c.access_token, self.ws_kw)
            conns[c.user_id] = conn

        await asyncio.gather(*[open_conn(c) for c in users])
        _say(f"{len(conns)} sockets open; sending {args.rate:g} msg/s for {args.duration:g}s")
        for conn in conns.values():
            conn.start()
        routes = [(conns[a.user_id], conv) for (a, _), conv in zip(pairs, convs, strict=True)]
        routes += [(conns[b.user_id], conv) for (_, b), conv in zip(pairs, convs, strict=True)]
        total = int(args.rate * args.duration)
        start = time.monotonic() + 0.2
        ticks = _cpu_ticks()
        loop_lag: list[float] = []
        for k in range(total):
            due = start + k / args.rate
            now = time.monotonic()
            if due > now + 0.0005:
                await asyncio.sleep(due - now)
                loop_lag.append(time.monotonic() - due)
            conn, conv = routes[k % len(routes)]
            conn.send(conv, due, k)
        send_end = time.monotonic()
        _say(f"sent {stats.sent}; waiting up to {args.grace:g}s for acks and deliveries")
        deadline = send_end + args.grace
        while time.monotonic() < deadline:
            acked = stats.acked
            if len(acked) >= stats.sent and all(cid in stats.delivered for cid in acked):
                break
            await asyncio.sleep(0.05)
        steal = _steal_pct(ticks, _cpu_ticks())
        for conn in conns.values():
            await conn.close()
        await session.close()
        for c in users:
            await c.close()
        acked_cids = set(stats.acked)
        delivered = sum(1 for cid in acked_cids if cid in stats.delivered)
        duplicates = sum(n - 1 for n in stats.delivered.values() if n > 1)
        seqs: dict[int, list[int]] = {}
        for conv, seq in stats.acked.values():
            seqs.setdefault(conv, []).append(seq)
        gap_convs = sum(1 for s in seqs.values() if sorted(s) != list(range(1, len(s) + 1)))
        span = max(stats.last_delivery - start, 1e-9)
        return {
            "mode": "load", "users": len(users), "rate": args.rate, "duration_s": args.duration,
            "sent": stats.sent, "acked": len(acked_cids), "delivered": delivered,
            "lost": len(acked_cids) - delivered, "duplicates": duplicates,
            "reordered": stats.reordered, "seq_gaps": gap_convs,
            "msgs_per_s": round(delivered / span, 1),
            "send_window_s": round(send_end - start, 3),
            "ack_p50_ms": round(_pct(stats.ack_ms, 0.5), 2),
            "ack_p99_ms": round(_pct(stats.ack_ms, 0.99), 2),
            "deliver_p50_ms": round(_pct(stats.deliver_ms, 0.5), 2),
            "deliver_p99_ms": round(_pct(stats.deliver_ms, 0.99), 2),
            "deliver_max_ms": round(max(stats.deliver_ms, default=float("nan")), 2),
            "scheduler_lag_p99_ms": round(_pct(loop_lag, 0.99) * 1000, 2),
            "cpu_steal_pct": steal,
            "errors": stats.errors,
        }

    async def serial(self) -> dict[str, Any]:
        a, b = await self.users(2)
        conv = await a.direct(b.user_id)
        stats = Stats()
        base = time.monotonic()
        session = aiohttp.ClientSession()
        conn = Conn(stats, base)
        await conn.open(session, a._http.base_url, a.access_token, self.ws_kw)
        conn.start()
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        ticks = _cpu_ticks()
        for n in range(self.args.serial):
            conn.waiter = loop.create_future()
            conn.send(conv, time.monotonic(), n)
            await asyncio.wait_for(conn.waiter, 30)
        total = time.monotonic() - started
        await conn.close()
        await session.close()
        for c in (a, b):
            await c.close()
        return {"mode": "serial", "sent": stats.sent, "acked": len(stats.acked),
                "serial_total_s": round(total, 3),
                "ack_p50_ms": round(_pct(stats.ack_ms, 0.5), 3),
                "ack_p99_ms": round(_pct(stats.ack_ms, 0.99), 3),
                "cpu_steal_pct": _steal_pct(ticks, _cpu_ticks())}

    async def idle(self, pids: list[int]) -> dict[str, Any]:
        """Open N idle authenticated sockets; server RSS growth per socket (needs --spawn)."""
        import psutil

        count = self.args.idle
        logins = await self.users(min(count, 100))
        procs = [psutil.Process(p) for p in pids]
        await asyncio.sleep(1)
        before = sum(p.memory_info().rss for p in procs)
        stats = Stats()
        sessions: list[aiohttp.ClientSession] = []
        conns = []
        sem = asyncio.Semaphore(64)

        async def open_one(i: int) -> None:
            # several 127.0.0.x source addresses keep clear of ephemeral port limits
            session = sessions[i % len(sessions)]
            c = logins[i % len(logins)]
            conn = Conn(stats, 0.0)
            async with sem:
                await conn.open(session, c._http.base_url, c.access_token, self.ws_kw)
            conns.append(conn)

        for j in range(max(1, count // 20000 + 1)):
            connector = aiohttp.TCPConnector(limit=0, local_addr=(f"127.0.0.{j + 2}", 0))
            sessions.append(aiohttp.ClientSession(connector=connector))
        await asyncio.gather(*[open_one(i) for i in range(count)])
        await asyncio.sleep(3)
        after = sum(p.memory_info().rss for p in procs)
        for conn in conns:
            await conn.close()
        for session in sessions:
            await session.close()
        for c in logins:
            await c.close()
        return {"mode": "idle", "connections": len(conns),
                "server_rss_before_mib": round(before / 2**20, 1),
                "server_rss_after_mib": round(after / 2**20, 1),
                "kib_per_connection": round((after - before) / max(1, len(conns)) / 1024, 2)}


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_ticks() -> list[int]:
    """The machine's CPU time counters (user ... steal) from /proc/stat; [] if unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            return [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def _steal_pct(before: list[int], after: list[int]) -> float | None:
    """Percent of CPU time the hypervisor gave to other guests while the bench ran: on a
    VM it takes cores away from the stack under test, so runs compare only at similar steal."""
    if len(before) < 8 or len(after) < 8:
        return None
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return round(100 * spent[7] / max(sum(spent), 1), 1)


async def _run(args: argparse.Namespace, stack: Stack | None) -> dict[str, Any]:
    pids: list[int] = []
    if stack is not None:
        urls = [s.url for s in stack.servers]
        pids = [s.proc.pid for s in stack.servers if s.proc]
        admin_token = stack.admin_token
    else:
        urls = [args.url.rstrip("/")]
        admin_token = args.admin_token or os.environ.get("IM_ADMIN_TOKEN", "")
        if not admin_token:
            raise SystemExit("bench: --url needs --admin-token (or IM_ADMIN_TOKEN)")
    bench = Bench(args, urls, admin_token)
    load_before = os.getloadavg()[0]
    if args.serial:
        result = await bench.serial()
    elif args.idle:
        if not pids:
            raise SystemExit("bench: --idle measures server memory, so it needs --spawn")
        result = await bench.idle(pids)
    else:
        result = await bench.load()
    result["nodes"] = len(urls)
    result["loadavg_1m_before"] = round(load_before, 2)
    result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    return result


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m im_server.bench", description=__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server or cloud, http(s)://host[:port]")
    target.add_argument("--spawn", type=int, metavar="N",
                        help="start N local server processes (and throwaway PostgreSQL/Redis)")
    parser.add_argument("--database-url", help="with --spawn: use this PostgreSQL")
    parser.add_argument("--redis-url", help="with --spawn: use this Redis")
    parser.add_argument("--admin-token", help="with --url: the cloud's admin token")
    parser.add_argument("--ca-file", help="CA bundle for https:// targets")
    parser.add_argument("--server-hostname", help="TLS name (and Host) when --url is an IP")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s in total")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--grace", type=float, default=15.0,
                        help="seconds to wait for outstanding acks/deliveries")
    parser.add_argument("--serial", type=int, metavar="N",
                        help="instead: N sends one after another, each waiting for its ack")
    parser.add_argument("--idle", type=int, metavar="N",
                        help="instead: N idle connections, report server memory per connection")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    if args.users < 2:
        parser.error("--users must be at least 2")
    _raise_nofile()
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally below removes the stack
    stack: Stack | None = None
    try:
        if args.spawn:
            stack = Stack(database_url=args.database_url, redis_url=args.redis_url,
                          extra_env={"IM_LOG_LEVEL": "WARNING"})
            stack.start()
            for _ in range(args.spawn):
                stack.add_server()
            _say(f"throwaway stack with {args.spawn} server(s) in {stack.dir}")
        result = uvloop.run(_run(args, stack))
    except (ImError, aiohttp.ClientError, OSError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if stack is not None:
            stack.close()
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        print(orjson.dumps(result).decode())
    bad = result.get("lost", 0) or result.get("duplicates", 0) or result.get("reordered", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

