"""Versioned, forward-only schema migrations (``migrations/NNNN_name.sql``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from .storage import Primary

__all__ = ["MIGRATIONS_DIR", "Migration", "applied_versions", "available", "migrate"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant: serialises concurrent `migrate` runs from several app nodes.
_LOCK_KEY = 0x494D5F4D4947


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.iterdir()):
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..N without gaps, got {versions}")
    return found


async def applied_versions(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply every migration not applied yet, each in its own transaction; return them."""
    pending = available(directory)
    conn = await Primary(dsn).connect()
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await applied_versions(conn)
            newer = [v for v in done if v > len(pending)]
            if newer:
                raise RuntimeError(
                    f"database has schema version {max(newer)}, newer than this release"
                    f" ({len(pending)}): refusing to run an older server against it"
                )
            ran = []
            for mig in pending:
                if mig.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(mig.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        mig.version,
                        mig.name,
                    )
                ran.append(mig)
            return ran
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()
