"""Helpers for the monitoring tests: inventories, free ports, real daemons."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv/bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _inventory(
    hosts: dict[str, str], groups: dict[str, list[str]], global_vars: dict[str, Any]
) -> dict[str, Any]:
    """An inventory shaped like the one `imcloud init` writes."""
    return {
        "all": {
            "vars": {"imcloud_domain": "chat.example.test", **global_vars},
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


def inventory(app_hosts: int = 2, receivers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A cluster inventory: lb1, data1 (db, cache, monitoring), app1..appN."""
    hosts = {"lb1": "10.9.0.10", "data1": "10.9.0.20"}
    hosts.update({f"app{i}": f"10.9.0.{30 + i}" for i in range(1, app_hosts + 1)})
    groups = {
        "lb": ["lb1"],
        "app": [f"app{i}" for i in range(1, app_hosts + 1)],
        "db": ["data1"],
        "cache": ["data1"],
        "monitoring": ["data1"],
    }
    return _inventory(
        hosts, groups, {"imcloud_tls_mode": "provided", "imcloud_alert_receivers": receivers or []}
    )


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
    return _inventory(
        hosts,
        groups,
        {
            "imcloud_profile": "ha",
            "imcloud_tls_mode": "internal",
            "imcloud_floating_address": "10.9.1.250",
            "imcloud_alert_receivers": [],
        },
    )


def prometheus_args(d: Path, port: int, scrape_configs: list[dict[str, Any]]) -> list[str]:
    """A Prometheus on 127.0.0.1:``port`` under /prometheus/ (as nginx proxies it), every
    second, with the shipped rules and console, scraping ``scrape_configs``."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "monitoring/prometheus/rules/*.yml")],
        "scrape_configs": scrape_configs,
    }
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    consoles = d / "consoles"
    consoles.mkdir()
    shutil.copy(ROOT / "monitoring/consoles/imcloud.html", consoles)
    return [
        "prometheus", f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url=http://127.0.0.1:{port}/prometheus/",
        f"--web.console.templates={consoles}", f"--web.console.libraries={consoles}",
    ]  # fmt: skip


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60) -> T:
    """Poll ``check`` every half second until it returns something true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.5)


@contextlib.contextmanager
def processes(stop_timeout: float = 10) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Processes the block starts (by name): terminated at its end, killed if they linger."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def certificates(d: Path, addresses: Iterable[str], name: str) -> None:
    """``ca.crt``/``ca.key`` and ``host.crt``/``host.key`` in ``d`` for the given IP addresses
    (like the tls role's SANs), EC P-256, two days."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test CA",
            "-days", "2")  # fmt: skip
    openssl("req", *ec, "-keyout", "host.key", "-out", "host.csr", "-subj", f"/CN={name}")
    (d / "ext").write_text("subjectAltName=" + ",".join(f"IP:{a}" for a in addresses) + "\n")
    openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "host.crt", "-days", "2", "-extfile", "ext")  # fmt: skip


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
