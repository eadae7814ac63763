"""A real Alertmanager with the rendered config: test notifications, fan-out, inhibition."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from monhelpers import daemon, free_port, inventory

from installer.core.alerts import firing_alerts, send_test_alerts
from installer.core.status import Api


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def alertmanager(
    render: Callable[..., dict[str, Path]],
    webhook: tuple[str, list[dict[str, Any]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Api, list[dict[str, Any]], list[dict[str, Any]]]]:
    closed = free_port()  # nothing listens there: deliveries to it fail at once
    receivers = [
        {"name": "good-hook", "type": "webhook", "url": webhook[0]},
        {"name": "dead-hook", "type": "webhook", "url": f"http://127.0.0.1:{closed}/hook"},
        {"name": "mail", "type": "email", "to": "ops@example.test",
         "smarthost": f"127.0.0.1:{closed}", "require_tls": False},
    ]  # fmt: skip
    config = render(inventory(receivers=receivers))["alertmanager"]
    tmp_path = tmp_path_factory.mktemp("alertmanager")
    port = free_port()
    base = f"http://127.0.0.1:{port}/alertmanager"
    args = [
        "prometheus-alertmanager", f"--config.file={config}",
        f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url={base}/", "--cluster.listen-address=",
    ]  # fmt: skip
    with daemon(args, f"{base}/-/ready", tmp_path / "alertmanager.log"):
        yield Api(base), receivers, webhook[1]


def _alert(name: str, severity: str, instance: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": name, "severity": severity, "instance": instance, "job": "x"},
        "annotations": {"summary": f"{name} test."},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=5)).isoformat(),
    }


def test_test_alert_reports_each_receiver(alertmanager: Any) -> None:
    api, receivers, received = alertmanager
    results = send_test_alerts(api, receivers, timeout=20)
    assert [(r.name, r.accepted) for r in results] == [
        ("good-hook", True), ("dead-hook", False), ("mail", False),
    ]  # fmt: skip
    test_alerts = [a for body in received for a in body["alerts"]]
    assert {a["labels"]["imcloud_test_receiver"] for a in test_alerts} == {"good-hook"}
    assert test_alerts[0]["labels"]["alertname"] == "ImcloudTestAlert"


def test_alerts_fan_out_and_critical_inhibits_warning(alertmanager: Any) -> None:
    api, _, _ = alertmanager
    api.post_json(
        "/api/v2/alerts",
        [
            _alert("RedisDown", "critical", "c1:9121"),
            _alert("RedisMemoryNearMax", "critical", "c1:9121"),
            _alert("RedisMemoryNearMax", "warning", "c1:9121"),
            _alert("NodeMemoryLow", "warning", "n1:9100"),
            _alert("Watchdog", "info", ""),
        ],
    )
    firing = firing_alerts(api)
    assert [(a.name, a.severity) for a in firing] == [
        ("RedisDown", "critical"), ("RedisMemoryNearMax", "critical"), ("NodeMemoryLow", "warning"),
    ]  # fmt: skip
    assert firing[0].receivers == ("dead-hook", "good-hook", "mail")
    muted = firing_alerts(api, include_muted=True)
    assert ("RedisMemoryNearMax", "warning") in [(a.name, a.severity) for a in muted]
    watchdog = [
        a for a in api.get_json("/api/v2/alerts") if a["labels"]["alertname"] == "Watchdog"
    ]
    assert [r["name"] for r in watchdog[0]["receivers"]] == ["watchdog"]
