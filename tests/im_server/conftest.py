"""Throwaway PostgreSQL 15 + Redis on free ports, and IM server processes against them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from im_helpers import FAST, require_binaries

from im_server.localstack import ServerProcess, Stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """PostgreSQL and Redis shared by the session; tests use distinct user names."""
    require_binaries()
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
    require_binaries()
    with Stack(fsync=False, extra_env=FAST) as st:
        yield st


