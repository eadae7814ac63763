"""im_commit (migration 0009): answers, gapless sequences, and plans that stay on indexes."""

from __future__ import annotations

import os

import asyncpg

from im_server.localstack import Stack
from im_server.migrate import migrate

COMMIT = "SELECT * FROM im_commit($1, $2, $3, $4, $5, $6)"

Send = tuple[int, int, str]  # (conversation, sender, client message id)


async def _database(stack: Stack, name: str) -> asyncpg.Connection:
    """A private database with users 1-3 and conversations 1 (users 1, 2) and 2 (users 2, 3)."""
    name = f"{name}{os.getpid()}"
    admin = await asyncpg.connect(stack.database_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = stack.database_url.rsplit("/", 1)[0] + "/" + name
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "INSERT INTO users (username, password_hash) VALUES ('a', 'x'), ('b', 'x'), ('c', 'x');"
        "INSERT INTO conversations (kind, direct_key) VALUES ('direct', '1:2'), ('direct', '2:3');"
        "INSERT INTO members VALUES (1, 1), (1, 2), (2, 2), (2, 3)"
    )
    return conn


async def _commit(conn: asyncpg.Connection, batch: list[Send]) -> list[tuple[int, str]]:
    n = len(batch)
    rows = await conn.fetch(COMMIT, [c for c, _, _ in batch], [s for _, s, _ in batch], [7] * n,
                            [cid for _, _, cid in batch], ['{"t": 1}'] * n, [1000] * n)
    assert [r["o_idx"] for r in rows] == list(range(1, n + 1))
    return [(r["o_seq"], r["o_status"]) for r in rows]


async def test_batches_and_single_sends_get_the_same_answers(stack: Stack) -> None:
    conn = await _database(stack, "commit")
    batches: list[list[Send]] = [
        [(1, 1, "a"), (2, 3, "b"), (1, 2, "c"), (2, 1, "x"), (99, 1, "y"), (1, 1, "d")],
        [(1, 1, "a"), (2, 2, "e"), (1, 2, "f")],  # a retry of "a" among fresh sends
    ]
    expected = [
        [(1, "ok"), (1, "ok"), (2, "ok"), (0, "not_member"), (0, "not_member"), (3, "ok")],
        [(1, "duplicate"), (2, "ok"), (4, "ok")],
    ]
    answers = {}
    for mode in ("batched", "one by one"):
        await conn.execute("DELETE FROM messages; UPDATE conversations SET last_seq = 0")
        got = []
        for batch in batches:
            if mode == "batched":
                got.append(await _commit(conn, batch))
            else:
                got.append([(await _commit(conn, [send]))[0] for send in batch])
        stored = await conn.fetch("SELECT conversation_id, seq, sender_id, client_msg_id"
                                  " FROM messages ORDER BY 1, 2")
        heads = await conn.fetch("SELECT id, last_seq FROM conversations ORDER BY id")
        answers[mode] = (got, [tuple(r) for r in stored], [tuple(r) for r in heads])
    assert answers["batched"] == answers["one by one"]
    got, stored, heads = answers["batched"]
    assert got == expected
    # retries and refused sends gave their numbers back: both sequences are gapless
    assert heads == [(1, 4), (2, 2)]
    assert [(c, s) for c, s, _, _ in stored] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)]
    row = await conn.fetchrow(COMMIT, [1], [1], [7], ["d"], ["{}"], [1000])
    assert row["o_members"] == [1, 2] and row["o_status"] == "duplicate" and row["o_seq"] == 3
    await conn.close()


async def test_no_plan_scans_messages(stack: Stack) -> None:
    """The writer's session caches each statement's plan for hours. A plan that scans
    messages (im_commit_batch's retry join did, once planned on a small table) gets
    slower with every message stored, so none of im_commit's plans may do that."""
    conn = await _database(stack, "plans")
    plans: list[str] = []
    conn.add_log_listener(lambda _conn, msg: plans.append(msg.message))
    await conn.execute(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
        " SET auto_explain.log_nested_statements = on; SET client_min_messages = log"
    )
    # plans made on a small table (a fresh install) for batches of 12, then used on a
    # bigger one: that is when im_commit_batch's cached join plan went sequential
    bulk = (
        "INSERT INTO messages (conversation_id, seq, sender_id, device_id, client_msg_id, body)"
        " SELECT 1, s, 1, 7, 'bulk' || s, repeat('x', 100) FROM generate_series($1::bigint, $2) s"
    )
    seq = 0
    for rows in (1_000, 20_000):
        await conn.execute(bulk, seq + 1, seq + rows)
        seq += rows
        await conn.execute("UPDATE conversations SET last_seq = $1 WHERE id = 1", seq)
        for _ in range(8):  # past PL/pgSQL's five custom plans, into the generic one
            batch = [(1, 1, f"r{seq + k}") for k in range(1, 12)] + [(1, 1, "bulk7")]
            assert await _commit(conn, batch) == [(seq + k, "ok") for k in range(1, 12)] + [
                (7, "duplicate")]
            seq += 11
    await conn.close()
    statements = [p for p in plans if "Query Text" in p]
    assert any("INSERT INTO messages" in p for p in statements)
    scans = [p for p in statements if "Seq Scan on messages" in p]
    assert not scans, scans[0]
