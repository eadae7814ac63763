"""Throwaway PostgreSQL 15 + Redis on free ports, and IM server processes against them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from im_helpers import FAST

from im_server.localstack import PG_BIN, REDIS_BIN, ServerProcess, Stack


def _require_binaries() -> None:
    if not (PG_BIN / "postgres").exists() or not shutil.which(REDIS_BIN):
        pytest.skip(f"needs PostgreSQL 15 in {PG_BIN} and {REDIS_BIN} (scripts/setup.sh)")


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """PostgreSQL and Redis shared by the session; tests use distinct user names."""
    _require_binaries()
    with Stack(fsync=False, extra_env=FAST) as st:
        yield st


@pytest.fixture(scope="session")
def server(stack: Stack) -> ServerProcess:
    return stack.add_server()


@pytest.fixture(scope="session")
def server2(stack: Stack, server: ServerProcess) -> ServerProcess:
    return stack.add_server()


@pytest.fixture
def fresh_stack() -> Iterator[Stack]:
    """A private stack for tests that break things (kill servers, restart Redis)."""
    _require_binaries()
    with Stack(fsync=False, extra_env=FAST) as st:
        yield st


