"""Helpers shared by the IM server tests (imported by name: pytest puts this dir on sys.path)."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest

from im_server.client import AdminClient, Client
from im_server.localstack import PG_BIN, REDIS_BIN, Stack

_names = itertools.count(1)

# Cheap argon2 in tests: login speed is not what they check.
FAST = {"IM_ARGON2_TIME_COST": "1", "IM_ARGON2_MEMORY_KIB": "1024", "IM_LOG_LEVEL": "WARNING"}


def require_binaries() -> None:
    if not (PG_BIN / "postgres").exists() or not shutil.which(REDIS_BIN):
        pytest.skip(f"needs PostgreSQL 15 in {PG_BIN} and {REDIS_BIN} (scripts/setup.sh)")


def unique(prefix: str = "u") -> str:
    return f"{prefix}{os.getpid()}x{next(_names)}"


async def make_user(stack: Stack, url: str, prefix: str = "u") -> tuple[str, int]:
    name = unique(prefix)
    async with AdminClient(url, stack.admin_token) as admin:
        created = await admin.create_user(name, "password123")
    return name, created["id"]


async def login(url: str, name: str, **kwargs: object) -> Client:
    client = await Client.login(url, name, "password123", **kwargs)  # type: ignore[arg-type]
    await client.connect()
    return client
