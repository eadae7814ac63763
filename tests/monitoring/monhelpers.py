"""Helpers for the monitoring tests: inventories, free ports, real daemons."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv/bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def inventory(app_hosts: int = 2, receivers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A cluster inventory shaped like the one `imcloud init` writes."""
    hosts = {"lb1": "10.9.0.10", "data1": "10.9.0.20"}
    hosts.update({f"app{i}": f"10.9.0.{30 + i}" for i in range(1, app_hosts + 1)})
    groups = {
        "lb": ["lb1"],
        "app": [f"app{i}" for i in range(1, app_hosts + 1)],
        "db": ["data1"],
        "cache": ["data1"],
        "monitoring": ["data1"],
    }
    return {
        "all": {
            "vars": {
                "imcloud_domain": "chat.example.test",
                "imcloud_tls_mode": "provided",
                "imcloud_alert_receivers": receivers or [],
            },
            "children": {
                "imcloud": {
                    "hosts": {
                        name: {"ansible_host": addr, "imcloud_internal_address": addr}
                        for name, addr in hosts.items()
                    },
                    "children": {g: {"hosts": dict.fromkeys(m)} for g, m in groups.items()},
                }
            },
        }
    }


def ha_inventory() -> dict[str, Any]:
    """An ha inventory shaped like `imcloud quickstart --profile ha` on three hosts."""
    hosts = {f"node{i}": f"10.9.1.{10 + i}" for i in (1, 2, 3)}
    groups = {
        "lb": ["node1", "node2"],
        "app": list(hosts),
        "db": list(hosts),
        "cache": list(hosts),
        "monitoring": ["node3"],
    }
    return {
        "all": {
            "vars": {
                "imcloud_domain": "chat.example.test",
                "imcloud_profile": "ha",
                "imcloud_tls_mode": "internal",
                "imcloud_floating_address": "10.9.1.250",
                "imcloud_alert_receivers": [],
            },
            "children": {
                "imcloud": {
                    "hosts": {
                        name: {"ansible_host": addr, "imcloud_internal_address": addr}
                        for name, addr in hosts.items()
                    },
                    "children": {g: {"hosts": dict.fromkeys(m)} for g, m in groups.items()},
                }
            },
        }
    }


@contextlib.contextmanager
def daemon(args: list[str], ready_url: str, log: Path, timeout: float = 30) -> Iterator[None]:
    """Run a daemon until the block ends; wait for ready_url to answer 200 first."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"{args[0]} exited: {log.read_text()[-2000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(ready_url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            assert time.monotonic() < deadline, f"{args[0]} not ready: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
