"""im_commit_one and im_commit_few answer exactly like im_commit_batch does."""

from __future__ import annotations

import os

import asyncpg

from im_server.localstack import Stack
from im_server.migrate import migrate

ONE = "SELECT * FROM im_commit_one($1, $2, $3, $4, $5, $6)"
BATCH = "SELECT * FROM im_commit_batch($1, $2, $3, $4, $5, $6)"
FEW = "SELECT * FROM im_commit_few($1, $2, $3, $4, $5, $6)"


async def _database(stack: Stack) -> asyncpg.Connection:
    """A private database with users 1-3 and conversations 1 (users 1, 2) and 2 (users 2, 3)."""
    name = f"commit{os.getpid()}"
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


async def test_one_and_batch_give_the_same_answers(stack: Stack) -> None:
    conn = await _database(stack)
    cases = [  # (conv, sender, cid): fresh, fresh, retry, not a member, unknown conversation
        (1, 1, "a"), (1, 2, "b"), (1, 1, "a"), (2, 1, "c"), (99, 1, "d"),
    ]
    answers = {}
    for function in ("one", "batch"):
        # each function works on its own conversations' copy: reset between the two runs
        await conn.execute("DELETE FROM messages; UPDATE conversations SET last_seq = 0")
        got = []
        for conv, sender, cid in cases:
            if function == "one":
                row = await conn.fetchrow(ONE, conv, sender, 7, cid, '{"t": 1}', 1000)
            else:
                row = await conn.fetchrow(BATCH, [conv], [sender], [7], [cid], ['{"t": 1}'],
                                          [1000])
            got.append(tuple(row))
        answers[function] = got
    assert answers["one"] == answers["batch"]
    assert [(seq, status) for _, seq, _, status, _ in answers["one"]] == [
        (1, "ok"), (2, "ok"), (1, "duplicate"), (0, "not_member"), (0, "not_member"),
    ]
    assert answers["one"][0][4] == [1, 2]
    assert await conn.fetchval("SELECT last_seq FROM conversations WHERE id = 1") == 2
    await conn.close()


async def test_few_and_batch_give_the_same_answers(stack: Stack) -> None:
    conn = await _database(stack)
    batches = [  # (conv, sender, cid) per send, one call per batch
        [(1, 1, "a"), (2, 3, "b"), (1, 2, "c"), (2, 1, "x"), (99, 1, "y"), (1, 1, "d")],
        [(1, 1, "a"), (2, 2, "e"), (1, 2, "f")],  # a retry of "a" among fresh sends
    ]
    answers = {}
    for query in (FEW, BATCH):
        await conn.execute("DELETE FROM messages; UPDATE conversations SET last_seq = 0")
        got = []
        for batch in batches:
            n = len(batch)
            rows = await conn.fetch(query, [c for c, _, _ in batch], [s for _, s, _ in batch],
                                    [7] * n, [cid for _, _, cid in batch], ['{"t": 1}'] * n,
                                    [1000] * n)
            got.append(sorted(tuple(r) for r in rows))
        stored = await conn.fetch("SELECT conversation_id, seq, sender_id, client_msg_id"
                                  " FROM messages ORDER BY 1, 2")
        answers[query] = (got, [tuple(r) for r in stored])
    assert answers[FEW] == answers[BATCH]
    first, second = answers[FEW][0]
    assert [(seq, status) for _, seq, _, status, _ in first] == [
        (1, "ok"), (1, "ok"), (2, "ok"), (0, "not_member"), (0, "not_member"), (3, "ok"),
    ]
    assert [(seq, status) for _, seq, _, status, _ in second] == [
        (1, "duplicate"), (2, "ok"), (4, "ok"),
    ]
    assert first[0][4] == [1, 2] and first[1][4] == [2, 3]
    await conn.close()
