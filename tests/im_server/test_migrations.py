"""Schema upgrades run forward: an old database is brought up to date by `migrate`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from im_server.localstack import Stack, free_port
from im_server.migrate import MIGRATIONS_DIR, applied_versions, available, migrate


async def _fresh_db(stack: Stack, name: str) -> str:
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return stack.database_url.rsplit("/", 1)[0] + "/" + name


async def _versions(dsn: str) -> set[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await applied_versions(conn)
    finally:
        await conn.close()


async def test_upgrade_from_the_first_release(stack: Stack, tmp_path: Path) -> None:
    dsn = await _fresh_db(stack, f"upgrade{os.getpid()}")
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(next(MIGRATIONS_DIR.glob("0001_*.sql")), old)
    assert [m.version for m in await migrate(dsn, old)] == [1]
    env = {**os.environ, **stack.env("upgrader", free_port()), "IM_DATABASE_URL": dsn,
           "IM_MIGRATE_ON_START": "false"}
    refused = subprocess.run([sys.executable, "-m", "im_server"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1
    assert f"missing migration(s) {list(range(2, len(available()) + 1))}" in refused.stderr
    assert "python -m im_server migrate" in refused.stderr
    done = subprocess.run([sys.executable, "-m", "im_server", "migrate"], env=env,
                          capture_output=True, text=True, timeout=60)
    later = [f"{m.version:04d}_{m.name}" for m in available()][1:]
    assert done.returncode == 0 and ", ".join(later) in done.stdout
    assert await _versions(dsn) == {m.version for m in available()}


async def test_newer_schema_is_refused(stack: Stack) -> None:
    dsn = await _fresh_db(stack, f"newer{os.getpid()}")
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'future')")
    await conn.close()
    with pytest.raises(RuntimeError, match="newer than this release"):
        await migrate(dsn)
