"""Health, readiness, metrics, rate limit, SIGTERM drain, migrations, settings."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from im_helpers import login, make_user

from im_server.localstack import ServerProcess, Stack
from im_server.server import MAX_STRIKES
from im_server.settings import SettingsError, load_settings, sentinel_addresses
from im_server.storage import host_dsns


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.read()


async def test_health_ready_and_metrics(stack: Stack, server: ServerProcess) -> None:
    status, body = await _get(server.url + "/healthz")
    assert status == 200 and orjson.loads(body)["status"] == "ok"
    status, body = await _get(server.url + "/readyz")
    assert status == 200 and orjson.loads(body) == {"status": "ready"}
    a_name, _ = await make_user(stack, server.url)
    b_name, b_id = await make_user(stack, server.url)
    a = await login(server.url, a_name)
    await a.send(await a.direct(b_id), "counted")
    status, body = await _get(server.url + "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("im_connections", 'im_frames_in_total{type="send"}', "im_frames_out_total",
                 "im_send_ack_seconds_bucket", "im_db_seconds_bucket", "im_redis_seconds",
                 "im_messages_total", "im_errors_total", "im_draining 0.0"):
        assert name in text, name
    await a.close()


async def test_rate_limit_then_close(stack: Stack) -> None:
    # A refill rate this slow adds no token during the test, so every frame after
    # the burst is a strike and the count below is exact.
    strict = stack.add_server(IM_RATE_PER_S="0.01", IM_RATE_BURST="5")
    try:
        name, _ = await make_user(stack, strict.url)
        client = await login(strict.url, name)
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(strict.url + "/ws", headers={
                "Authorization": f"Bearer {client.access_token}"})
            await ws.receive()  # hello
            for _ in range(10):
                await ws.send_str('{"type": "ping"}')
            frames = [orjson.loads((await ws.receive(timeout=5)).data) for _ in range(6)]
            assert [f["type"] for f in frames].count("pong") == 5
            assert {"type": "error", "code": "rate_limited"}.items() <= frames[-1].items()
            # Five strikes so far; flood until exactly one past the limit and stop:
            # the server closes with 1008. (A client still writing after that could
            # find its transport closed, or the close frame lost to a TCP reset.)
            for _ in range(MAX_STRIKES + 1 - 5):
                await ws.send_str('{"type": "ping"}')
            while (await ws.receive(timeout=5)).type not in (aiohttp.WSMsgType.CLOSE,
                                                             aiohttp.WSMsgType.CLOSED):
                pass
            assert ws.close_code == 1008
        await client.ping()  # a polite client on the same node is still served
        await client.close()
    finally:
        strict.stop()


async def test_sigterm_drains_and_asks_clients_to_reconnect(stack: Stack) -> None:
    node = stack.add_server(IM_DRAIN_SECONDS="5")
    name, _ = await make_user(stack, node.url)
    client = await login(node.url, name, reconnect=False)
    node.signal(signal.SIGTERM)
    with pytest.raises(Exception):  # noqa: B017 - the socket ends, with code 1012
        await client.next_message(timeout=10)
    assert client.close_code == 1012
    assert await asyncio.to_thread(node.wait, 15) == 0
    await client.close()


def test_migrate_command_is_idempotent(stack: Stack) -> None:
    env = {**os.environ, **stack.env("migrator", 1)}
    cmd = [sys.executable, "-m", "im_server", "migrate"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_missing_settings_fail_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IM_")}
    done = subprocess.run([sys.executable, "-m", "im_server"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "im_server: missing required setting(s): IM_DATABASE_URL, IM_REDIS_URL,"
        " IM_ADMIN_TOKEN, IM_TOKEN_SECRET"]


def test_settings_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "im.env"
    path.write_text("# comment\nIM_DATABASE_URL=postgresql://db/im\nIM_REDIS_URL='redis://r'\n"
                    "IM_ADMIN_TOKEN=a\nIM_TOKEN_SECRET=s\nIM_PORT=9000\n"
                    "IM_OPEN_REGISTRATION=yes\n")
    settings = load_settings({"IM_CONFIG_FILE": str(path), "IM_PORT": "9100",
                              "IM_NODE_ID": "app1"})
    assert (settings.database_url, settings.redis_url) == ("postgresql://db/im", "redis://r")
    assert (settings.port, settings.node_id, settings.open_registration) == (9100, "app1", True)
    assert settings.host == "127.0.0.1" and settings.tls_ca_file is None
    with pytest.raises(SettingsError, match="IM_PORT: expected a number"):
        load_settings({"IM_CONFIG_FILE": str(path), "IM_PORT": "http"})
    with pytest.raises(SettingsError, match="IM_OPEN_REGISTRATION"):
        load_settings({"IM_CONFIG_FILE": str(path), "IM_OPEN_REGISTRATION": "maybe"})
    path.write_text("IM_DATABASE_URL\n")
    with pytest.raises(SettingsError, match=r"im.env:1: expected KEY=value"):
        load_settings({"IM_CONFIG_FILE": str(path)})


def test_sentinel_settings() -> None:
    base = {"IM_DATABASE_URL": "postgresql://db/im", "IM_REDIS_URL": "rediss://u:p@x:6379/0",
            "IM_ADMIN_TOKEN": "a", "IM_TOKEN_SECRET": "s"}
    plain = load_settings(base)
    assert (plain.redis_sentinels, plain.redis_sentinel_master) == ("", "imcloud")
    assert sentinel_addresses(plain.redis_sentinels) == []
    ha = load_settings({**base, "IM_REDIS_SENTINELS": "10.0.0.1:26379, 10.0.0.2:26379,[::1]:26380",
                        "IM_REDIS_SENTINEL_PASSWORD": "pw"})
    assert sentinel_addresses(ha.redis_sentinels) == [
        ("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)]
    assert ha.redis_sentinel_password == "pw"
    for bad in ("10.0.0.1", "10.0.0.1:sentinel", ":26379", "h:0"):
        with pytest.raises(SettingsError, match="IM_REDIS_SENTINELS: expected host:port"):
            load_settings({**base, "IM_REDIS_SENTINELS": bad})
    with pytest.raises(SettingsError, match="IM_REDIS_HEALTH_TIMEOUT_S"):
        load_settings({**base, "IM_REDIS_HEALTH_TIMEOUT_S": "0"})


def test_host_dsns_split_a_multi_host_dsn() -> None:
    multi = "postgresql://im:p%40w@h1:5432,h2,[::1]:5433/imcloud?target_session_attrs=read-write"
    assert host_dsns(multi) == [
        "postgresql://im:p%40w@h1:5432/imcloud?target_session_attrs=read-write",
        "postgresql://im:p%40w@h2/imcloud?target_session_attrs=read-write",
        "postgresql://im:p%40w@[::1]:5433/imcloud?target_session_attrs=read-write",
    ]
    for single in ("postgresql://im@%2Ftmp%2Fpg:5432/im", "postgresql:///im?host=/run/pg"):
        assert host_dsns(single) == [single]
