"""im_commit_one answers exactly like im_commit_batch does for a batch of one send."""

from __future__ import annotations

import os

import asyncpg

from im_server.localstack import Stack
from im_server.migrate import migrate

ONE = "SELECT * FROM im_commit_one($1, $2, $3, $4, $5, $6)"
BATCH = "SELECT * FROM im_commit_batch($1, $2, $3, $4, $5, $6)"


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
