"""`imcloud verify`: run the shipped testinfra suite against every host of a cloud.

The suite (``installer/verify_tests/``) runs in a pytest subprocess of this
interpreter, so it needs nothing but what the controller already has. Its
conftest appends one JSON line per finished test to a results file, which this
module reads while the run goes on (live progress) and at the end (the report).
The full pytest output goes to a log file in the cloud's ``logs/``.

The tables of what should run and listen where live here, next to the run, so
the tests and their documentation share one source.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from installer.core.cloud import Cloud, Host
from installer.core.preflight import HA_ROLE_PORTS, ROLE_PORTS, ports_for
from installer.errors import ImcloudError

TESTS_DIR = Path(__file__).resolve().parent.parent / "verify_tests"
#: Upper bound of a whole verify run; single steps have their own, shorter timeouts.
RUN_TIMEOUT_S = 900

#: systemd units per role (docs/architecture.md); "*" is every host.
SERVICES: dict[str, tuple[str, ...]] = {
    "*": ("nftables",),
    "lb": ("nginx",),
    "app": ("imcloud-im-server",),
    "db": ("postgresql", "postgresql@15-main"),
    "cache": ("redis-server",),
}
#: Profile ha's units where they differ (docs/ha.md): Patroni runs PostgreSQL.
HA_SERVICES: dict[str, tuple[str, ...]] = {
    "lb": ("nginx", "keepalived"),
    "db": ("etcd", "patroni"),
    "cache": ("redis-server", "redis-sentinel"),
}
#: Installed only when the cloud has a monitoring host (exporters feed it).
MONITORING_SERVICES: dict[str, tuple[str, ...]] = {
    "*": ("prometheus-node-exporter",),
    "lb": ("prometheus-nginx-exporter", "mtail"),
    "db": ("prometheus-postgres-exporter",),
    "cache": ("prometheus-redis-exporter",),
    "monitoring": ("prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter"),
}
#: Every internal port of the design; none may answer a client outside the cluster.
INTERNAL_PORTS: tuple[int, ...] = tuple(
    sorted(
        {p for table in (ROLE_PORTS, HA_ROLE_PORTS) for ports in table.values() for p in ports}
        - {22, 80, 443}
    )
)
EXPORTER_PORTS: frozenset[int] = frozenset(
    {9100, 9187, 9121, 9122, 9113, 3903, 9115, 9090, 9093}
)
#: Private keys and files holding secrets may not be readable by "other"; keys not
#: writable by the group either.
KEY_FORBIDDEN_BITS = 0o027
SECRET_FORBIDDEN_BITS = 0o007
ENV_FILE = "/etc/imcloud/im_server.env"


def _per_role(table: dict[str, tuple[str, ...]], roles: tuple[str, ...]) -> list[str]:
    names = list(table.get("*", ()))
    for role in roles:
        names += [n for n in table.get(role, ()) if n not in names]
    return names


def has_monitoring(cloud: Cloud) -> bool:
    return bool(cloud.hosts_in("monitoring"))


def expected_services(cloud: Cloud, host: Host) -> list[str]:
    services = {**SERVICES, **HA_SERVICES} if cloud.config.profile == "ha" else SERVICES
    names = _per_role(services, host.roles)
    if has_monitoring(cloud):
        names += [n for n in _per_role(MONITORING_SERVICES, host.roles) if n not in names]
    return names


def public_ports(host: Host) -> set[int]:
    """Ports open to the world on this host: SSH, and HTTP(S) on the load balancer."""
    return {22, 80, 443} if "lb" in host.roles else {22}


def internal_ports(cloud: Cloud, host: Host) -> set[int]:
    """Ports this host listens on for cluster members only, on its internal address."""
    ports = set(ports_for(host.roles, cloud.config.profile)) - public_ports(host)
    if not has_monitoring(cloud):
        ports -= EXPORTER_PORTS
    return ports


def cloud_tls_context(cloud: Cloud) -> ssl.SSLContext:
    """Trust for the cloud's HTTPS: its trust anchor only (Cloud.tls_trust_anchor)."""
    anchor = cloud.tls_trust_anchor
    return ssl.create_default_context(cafile=None if anchor is None else str(anchor))


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS for the cloud's domain (SNI, Host, certificate name) sent to a given address, so
    it works before or without DNS for the domain."""

    def __init__(self, domain: str, address: str, context: ssl.SSLContext, timeout: float):
        super().__init__(domain, 443, context=context, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _reaching(
    cloud: Cloud, timeout: float = 15, address: str | None = None
) -> Iterator[_PinnedHTTPSConnection]:
    """An HTTPS connection to the cloud's load balancer (or the lb host at ``address``);
    failures become one clear error."""
    address = address or cloud.lb_address
    conn = _PinnedHTTPSConnection(cloud.config.domain, address, cloud_tls_context(cloud), timeout)
    try:
        yield conn
    except ssl.SSLCertVerificationError as exc:
        raise ImcloudError(
            f"{cloud.public_url} at {address}: TLS certificate not trusted "
            f"({exc.verify_message}); trusted: {cloud.tls_trust_anchor or 'the system CAs'}"
        ) from None
    except OSError as exc:
        raise ImcloudError(
            f"cannot reach {cloud.public_url} at {address}:443 ({exc}); "
            "is the cloud installed (`imcloud install`)?"
        ) from None
    finally:
        conn.close()


def peer_certificate(cloud: Cloud) -> tuple[dict[str, Any], str]:
    """The verified certificate the load balancer presents for the domain, and the TLS version."""
    with _reaching(cloud) as conn:
        conn.connect()
        tls: ssl.SSLSocket = conn.sock
        cert, version = tls.getpeercert(), tls.version()
    if not cert or version is None:
        raise ImcloudError(f"{cloud.public_url} at {cloud.lb_address}: no certificate presented")
    return dict(cert), version


def https_request(
    cloud: Cloud,
    method: str,
    path: str,
    *,
    body: Any = None,
    bearer: str | None = None,
    basic: tuple[str, str] | None = None,
    timeout: float = 15,
    address: str | None = None,
) -> tuple[int, Any]:
    """One JSON request to the cloud through its load balancer (default: the public address,
    else the lb host at ``address``); returns (status, decoded body)."""
    headers = {"Accept": "application/json"}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    if basic is not None:
        token = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    with _reaching(cloud, timeout, address) as conn:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = raw.decode(errors="replace")
    return response.status, data


@dataclass
class CheckResult:
    """One test of the suite: an area (module), a check (function), the host it ran on."""

    area: str
    check: str
    target: str
    outcome: str  # passed | failed | error | skipped
    message: str
    duration_s: float
    nodeid: str

    @property
    def ok(self) -> bool:
        return self.outcome in ("passed", "skipped")


@dataclass
class VerifyReport:
    results: list[CheckResult]
    log_path: Path
    duration_s: float
    returncode: int

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        # pytest exits 0 (all passed) or 1 (some failed); anything else broke the run itself
        return self.returncode == 0 and not self.failures and bool(self.results)

    def counts(self) -> dict[str, int]:
        counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for r in self.results:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        return counts

    def failure_lines(self) -> list[str]:
        lines = [f"{r.target}: {r.area}/{r.check}: {r.message}" for r in self.failures]
        if not self.results or self.returncode not in (0, 1):
            lines.append(f"the test run itself failed (pytest exit {self.returncode}): see log")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "counts": self.counts(),
            "duration_s": round(self.duration_s, 1),
            "log": str(self.log_path),
            "failures": self.failure_lines(),
            "results": [asdict(r) for r in self.results],
        }


def parse_result_line(line: str) -> CheckResult | None:
    """One JSON line written by the suite's conftest; None for a partial line."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    return CheckResult(**data)


def pytest_command(cloud: Cloud, results_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        str(TESTS_DIR),
        "-c",
        str(TESTS_DIR / "pytest.ini"),
        "--rootdir",
        str(TESTS_DIR),
        f"--imcloud-cloud={cloud.dir}",
        f"--imcloud-results={results_path}",
    ]


def run_verify(
    cloud: Cloud,
    on_result: Callable[[CheckResult], None] | None = None,
    extra_args: list[str] | None = None,
) -> VerifyReport:
    """Run the suite against every host. Reads only; creates and removes two temporary
    users on the IM server for the message test."""
    if not cloud.hosts:
        raise ImcloudError(f"{cloud.config_path}: no hosts to verify")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    log_path = cloud.logs_dir / f"verify-{stamp}.log"
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_ADDOPTS": "",
        "IMCLOUD_DIR": str(cloud.dir),
    }
    results: list[CheckResult] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imcloud-verify-") as tmp:
        results_path = Path(tmp) / "results.jsonl"
        results_path.touch()
        command = pytest_command(cloud, results_path) + (extra_args or [])
        with open(log_path, "wb") as log, open(results_path) as feed:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
            pending = ""
            while True:
                finished = proc.poll() is not None
                pending += feed.read()
                *lines, pending = pending.split("\n")
                for line in lines:
                    result = parse_result_line(line)
                    if result is not None:
                        results.append(result)
                        if on_result is not None:
                            on_result(result)
                if finished:
                    break
                if time.monotonic() - started > RUN_TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                    raise ImcloudError(
                        f"verify did not finish within {RUN_TIMEOUT_S} s; see {log_path}"
                    )
                time.sleep(0.2)
    return VerifyReport(
        results=results,
        log_path=log_path,
        duration_s=time.monotonic() - started,
        returncode=proc.returncode,
    )
