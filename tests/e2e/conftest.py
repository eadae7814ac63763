"""Fixtures shared by the lab tests.

Each test module names its lab and its size with module constants ``LAB_NAME``
and ``NODES``; the module's tests share that lab, which is removed when the
module ends, also when a test fails.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from installer.core.lab import Lab
from installer.core.runner import RunResult, log_tail


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(request.module.LAB_NAME)
    try:
        lab.up(request.module.NODES)
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def ssh(lab: Lab) -> Callable[[str, str], subprocess.CompletedProcess[str]]:
    """``ssh(node, command)``: a shell command on a lab host, as root."""

    def run(node: str, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            lab.ssh_command(node, command), capture_output=True, text=True, timeout=120
        )

    return run


@pytest.fixture(scope="session")
def explain() -> Callable[[RunResult], str]:
    """``explain(result)``: an install run's failures and its log's last lines, for asserts."""

    def describe(result: RunResult) -> str:
        failures = "\n".join(f"{f.host}: {f.task}: {f.message}" for f in result.failures)
        return f"{failures}\n--- last lines of {result.log_path}:\n{log_tail(result.log_path, 60)}"

    return describe
