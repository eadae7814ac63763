"""Each component's health as Prometheus sees it, and how the CLI reaches Prometheus.

Prometheus and Alertmanager listen on the monitoring host's internal address under
the route prefixes ``/prometheus`` and ``/alertmanager`` (so nginx can proxy them).
The CLI reaches them through an SSH port forward to the monitoring host (default)
or through nginx with basic auth (user ``monitor``, secret ``imcloud_monitoring_password``).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlsplit

from installer.errors import ImcloudError

if TYPE_CHECKING:
    from installer.core.cloud import Cloud, Host

__all__ = [
    "Api",
    "ComponentStatus",
    "HaRoles",
    "MonitoringApis",
    "collect_ha_roles",
    "collect_status",
    "ha_roles",
    "monitoring_apis",
    "parse_metrics",
]

PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
MONITOR_USER = "monitor"

Via = Literal["ssh", "nginx"]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with SNI, Host and certificate check for the URL's name."""

    def __init__(self, host: str, port: int, *, address: str, context: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._pinned_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port or 443), self.timeout)
        self.sock = self._pinned_context.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class Api:
    """A small JSON/text HTTP client for one base URL (Prometheus or Alertmanager).

    ``connect_to`` dials that address instead of resolving the URL's host name (the
    lb host, when the cloud's domain is not in DNS yet); TLS still checks the name.
    """

    base_url: str
    auth: tuple[str, str] | None = None
    ca_file: Path | None = None
    connect_to: str | None = None
    timeout: float = 10.0

    def _connection(self) -> http.client.HTTPConnection:
        url = urlsplit(self.base_url)
        host = url.hostname or ""
        if url.scheme == "http":
            return http.client.HTTPConnection(
                self.connect_to or host, url.port or 80, timeout=self.timeout
            )
        context = ssl.create_default_context(cafile=self.ca_file)
        return _PinnedHTTPSConnection(
            host, url.port or 443, address=self.connect_to or host, context=context,
            timeout=self.timeout,
        )  # fmt: skip

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        where = f"{self.base_url}{path}"
        headers = {"Host": urlsplit(self.base_url).netloc}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.auth is not None:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        conn = self._connection()
        try:
            conn.request(
                "POST" if body is not None else "GET",
                urlsplit(self.base_url).path.rstrip("/") + path,
                body=body,
                headers=headers,
            )
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ImcloudError(f"{where}: {exc}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise ImcloudError(f"{where}: HTTP {resp.status} {resp.reason}")
        return data

    def get_text(self, path: str) -> str:
        return self._request(path).decode()

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def post_json(self, path: str, payload: Any) -> Any:
        raw = self._request(path, json.dumps(payload).encode())
        return json.loads(raw) if raw.strip() else None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant Prometheus query: a list of ``{"metric": {...}, "value": [ts, "v"]}``."""
        data = self.get_json(f"/api/v1/query?query={quote(promql)}")
        if data.get("status") != "success":
            raise ImcloudError(f"Prometheus query failed: {data.get('error', data)}")
        return list(data["data"]["result"])


@dataclass(frozen=True)
class MonitoringApis:
    prometheus: Api
    alertmanager: Api


def _free_ports(count: int) -> list[int]:
    """Distinct free local ports (all held at once while choosing, so never the same twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            error = proc.stderr.read().decode().strip() if proc.stderr else ""
            raise ImcloudError(f"SSH port forward to the monitoring host failed: {error}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise ImcloudError("SSH port forward to the monitoring host did not come up in time")


@contextlib.contextmanager
def monitoring_apis(cloud: Cloud, via: Via = "ssh") -> Iterator[MonitoringApis]:
    """Yield clients for the cloud's Prometheus and Alertmanager; close what was opened."""
    if via == "nginx":
        password = cloud.secrets().get("imcloud_monitoring_password")
        if not password:
            raise ImcloudError("secrets.yml has no imcloud_monitoring_password")
        auth = (MONITOR_USER, password)
        ca = cloud.tls_trust_anchor
        base, lb = cloud.public_url, cloud.lb_address
        yield MonitoringApis(
            Api(f"{base}/prometheus", auth=auth, ca_file=ca, connect_to=lb),
            Api(f"{base}/alertmanager", auth=auth, ca_file=ca, connect_to=lb),
        )
        return
    hosts = cloud.hosts_in("monitoring")
    if not hosts:
        raise ImcloudError("no host has the monitoring role in imcloud.yml")
    with _ssh_forward(hosts[0]) as apis:
        yield apis


@contextlib.contextmanager
def _ssh_forward(host: Host, attempts: int = 3) -> Iterator[MonitoringApis]:
    """Forward two free local ports to Prometheus and Alertmanager on the monitoring host.

    Another process may take a port between choosing it and ssh binding it; the
    forward only counts once both services answer their readiness URL through it.
    """
    problem = ""
    for _ in range(attempts):
        prom_port, am_port = _free_ports(2)
        command = [
            "ssh", "-N", "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{prom_port}:{host.internal_address}:{PROMETHEUS_PORT}",
            "-L", f"127.0.0.1:{am_port}:{host.internal_address}:{ALERTMANAGER_PORT}",
            *host.ssh_args(),
        ]  # fmt: skip
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _wait_for_port(prom_port, proc, timeout=20)
            apis = MonitoringApis(
                Api(f"http://127.0.0.1:{prom_port}/prometheus"),
                Api(f"http://127.0.0.1:{am_port}/alertmanager"),
            )
            try:
                apis.prometheus.get_text("/-/ready")
                apis.alertmanager.get_text("/-/ready")
            except ImcloudError as exc:
                problem = str(exc)
                continue
            if proc.poll() is None:
                yield apis
                return
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    raise ImcloudError(
        f"cannot reach Prometheus and Alertmanager on {host.name} through SSH: {problem}"
    )


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse the Prometheus text format (enough for Alertmanager's own /metrics)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels: dict[str, str] = {}
        for pair in filter(None, rest.rstrip("}").split('",')):
            key, _, val = pair.partition("=")
            labels[key.strip(",")] = val.strip('"')
        try:
            out.setdefault(name, []).append((labels, float(value)))
        except ValueError:
            continue
    return out


# -- component health ----------------------------------------------------------


def _pct(v: float) -> str:
    return f"{v * 100:.0f}%"


def _num(v: float) -> str:
    return f"{v:.0f}" if v == int(v) else f"{v:.1f}"


def _ms(v: float) -> str:
    return f"{v * 1000:.0f}ms"


def _days(v: float) -> str:
    return f"{v / 86400:.0f}d"


def _patroni_role(v: float) -> str:
    return {2: "primary", 1: "sync standby"}.get(int(v), "replica")


# Per scrape job: (figure, PromQL by instance, formatter). Names from monitoring/prometheus/rules.
FIGURES: dict[str, list[tuple[str, str, Callable[[float], str]]]] = {
    "node": [
        ("cpu", 'instance:node_cpu_utilisation:rate5m{job="node"}', _pct),
        ("mem free", 'instance:node_memory_available:ratio{job="node"}', _pct),
        ("disk free", "min by (job, instance) (instance:node_filesystem_avail:ratio)", _pct),
    ],
    "im_server": [
        ("conns", 'im_connections{job="im_server"}', _num),
        ("msg/s", 'sum by (job, instance) (rate(im_messages_total{job="im_server"}[5m]))', _num),
        ("p99 ack", 'instance:im_send_ack_seconds:p99_rate5m{job="im_server"}', _ms),
    ],
    "postgres": [
        ("db up", 'pg_up{job="postgres"}', _num),
        ("conns used", 'instance:pg_connections:ratio{job="postgres"}', _pct),
    ],
    "redis": [
        ("redis up", 'redis_up{job="redis"}', _num),
        ("mem used", 'instance:redis_memory_used:ratio{job="redis"}', _pct),
        ("clients", 'redis_connected_clients{job="redis"}', _num),
    ],
    "nginx": [
        ("nginx up", 'nginx_up{job="nginx"}', _num),
        ("active conns", 'nginx_connections_active{job="nginx"}', _num),
    ],
    "blackbox_https": [
        ("probe ok", 'probe_success{job="blackbox_https"}', _num),
        ("cert left", 'probe_ssl_earliest_cert_expiry{job="blackbox_https"} - time()', _days),
    ],
    "blackbox_wss": [("probe ok", 'probe_success{job="blackbox_wss"}', _num)],
    # Profile ha (docs/ha.md).
    "blackbox_lb": [("probe ok", 'probe_success{job="blackbox_lb"}', _num)],
    "patroni": [
        ("db up", 'patroni_postgres_running{job="patroni"}', _num),
        (
            "role",
            'patroni_primary{job="patroni"} * 2 + patroni_sync_standby{job="patroni"}',
            _patroni_role,
        ),
    ],
    "etcd": [
        ("has leader", 'etcd_server_has_leader{job="etcd"}', _num),
        ("leader", 'etcd_server_is_leader{job="etcd"}', _num),
    ],
    "sentinel": [
        ("sentinel up", 'redis_up{job="sentinel"}', _num),
        ("ok sentinels", 'redis_sentinel_master_ok_sentinels{job="sentinel"}', _num),
        ("ok replicas", 'redis_sentinel_master_ok_slaves{job="sentinel"}', _num),
    ],
}
# A figure of 0 here means the component behind a live exporter is down.
LIVENESS = {"db up", "redis up", "nginx up", "probe ok", "has leader", "sentinel up"}


@dataclass
class ComponentStatus:
    job: str
    instance: str
    host: str
    up: bool
    figures: dict[str, str] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)

    @property
    def health(self) -> str:
        if not self.up or any(self.figures.get(name) == "0" for name in LIVENESS):
            return "down"
        return "degraded" if self.alerts else "ok"

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "instance": self.instance,
            "host": self.host,
            "health": self.health,
            "up": self.up,
            "figures": self.figures,
            "alerts": self.alerts,
        }


def _host(address: str, host_names: dict[str, str]) -> str:
    """The host name of ``address:port``, ``[v6]:port`` or a probe URL (else the address)."""
    bare = address.split("://")[-1].split("/")[0].rsplit(":", 1)[0].strip("[]")
    return host_names.get(bare, bare)


def collect_status(prometheus: Api, host_names: dict[str, str]) -> list[ComponentStatus]:
    """One row per scrape target; ``host_names`` maps internal addresses to host names."""
    rows: dict[tuple[str, str], ComponentStatus] = {}
    for sample in prometheus.query("up"):
        labels = sample["metric"]
        job, instance = labels.get("job", ""), labels.get("instance", "")
        rows[(job, instance)] = ComponentStatus(
            job=job,
            instance=instance,
            host=_host(instance, host_names),
            up=sample["value"][1] == "1",
        )
    for job, figures in FIGURES.items():
        for name, promql, fmt in figures:
            for sample in prometheus.query(promql):
                row = rows.get((job, sample["metric"].get("instance", "")))
                value = float(sample["value"][1])
                if row is not None:
                    row.figures[name] = "-" if math.isnan(value) else fmt(value)
    alerts = prometheus.get_json("/api/v1/alerts")["data"]["alerts"]
    for alert in alerts:
        labels = alert["labels"]
        row = rows.get((labels.get("job", ""), labels.get("instance", "")))
        if row is not None and alert.get("state") == "firing":
            row.alerts.append(f"{labels.get('alertname')}({labels.get('severity', '')})")
    return sorted(rows.values(), key=lambda r: (r.job, r.host, r.instance))


# -- who holds the ha roles (profile ha) ----------------------------------------

SENTINEL_MASTER = "imcloud"
# Names from Patroni 3.0's GET /metrics (job "patroni") and redis_exporter 1.45
# pointed at a Sentinel (job "sentinel"); see monitoring/prometheus/rules.
PRIMARY_QUERY = (
    'patroni_primary{job="patroni"} == 1'
    ' and on (job, instance) patroni_postgres_running{job="patroni"} == 1'
)
SYNC_STANDBY_QUERY = 'patroni_sync_standby{job="patroni"} == 1'
SENTINEL_MASTER_QUERY = (
    f'redis_sentinel_master_status{{job="sentinel", master_name="{SENTINEL_MASTER}"}} == 1'
)


@dataclass(frozen=True)
class HaRoles:
    """The db hosts Patroni reports as primary and sync standby, the cache hosts the
    Sentinels name as Redis master (with the Sentinels' hosts naming each)."""

    postgres_primary: list[str]
    postgres_sync_standby: list[str]
    redis_master: dict[str, list[str]]

    @property
    def problems(self) -> list[str]:
        """Why this is not the shape of docs/ha.md (one of each), in words."""
        found = []
        for what, hosts in (
            ("PostgreSQL primaries", self.postgres_primary),
            ("synchronous standbys", self.postgres_sync_standby),
        ):
            if len(hosts) != 1:
                named = f": {', '.join(hosts)}" if hosts else ""
                found.append(f"{len(hosts)} {what} (Patroni){named}")
        if not self.redis_master:
            found.append("no Sentinel sees a reachable Redis master")
        elif len(self.redis_master) > 1:
            named = "; ".join(f"{m} by {', '.join(s)}" for m, s in self.redis_master.items())
            found.append(f"the Sentinels name {len(self.redis_master)} Redis masters: {named}")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "postgres_primary": self.postgres_primary,
            "postgres_sync_standby": self.postgres_sync_standby,
            "redis_master": self.redis_master,
            "problems": self.problems,
        }


def ha_roles(
    primary: list[dict[str, Any]],
    sync_standby: list[dict[str, Any]],
    sentinel_master: list[dict[str, Any]],
    host_names: dict[str, str],
) -> HaRoles:
    """HaRoles from the samples of PRIMARY_QUERY, SYNC_STANDBY_QUERY and SENTINEL_MASTER_QUERY."""

    def hosts(samples: list[dict[str, Any]]) -> list[str]:
        return sorted({_host(s["metric"].get("instance", ""), host_names) for s in samples})

    masters: dict[str, set[str]] = {}
    for sample in sentinel_master:
        labels = sample["metric"]
        master = _host(labels.get("master_address", ""), host_names)
        masters.setdefault(master, set()).add(_host(labels.get("instance", ""), host_names))
    return HaRoles(
        postgres_primary=hosts(primary),
        postgres_sync_standby=hosts(sync_standby),
        redis_master={m: sorted(s) for m, s in sorted(masters.items())},
    )


def collect_ha_roles(prometheus: Api, host_names: dict[str, str]) -> HaRoles:
    return ha_roles(
        prometheus.query(PRIMARY_QUERY),
        prometheus.query(SYNC_STANDBY_QUERY),
        prometheus.query(SENTINEL_MASTER_QUERY),
        host_names,
    )
