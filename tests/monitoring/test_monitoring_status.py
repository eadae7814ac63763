"""collect_status and the console page against a real Prometheus loaded with the shipped rules."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from monhelpers import ROOT, daemon, free_port

from installer.core.status import Api, collect_status


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Api, int]]:
    port, dead = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "monitoring/prometheus/rules/*.yml")],
        "scrape_configs": [
            {
                "job_name": "prometheus",
                "metrics_path": "/prometheus/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"host": "mon"}}],
            },
            {
                "job_name": "node",
                "static_configs": [{"targets": [f"127.0.0.1:{dead}"], "labels": {"host": "gone"}}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    consoles = tmp_path / "consoles"
    consoles.mkdir()
    (consoles / "imcloud.html").write_text((ROOT / "monitoring/consoles/imcloud.html").read_text())
    base = f"http://127.0.0.1:{port}/prometheus"
    args = [
        "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url={base}/", f"--web.console.templates={consoles}",
        f"--web.console.libraries={consoles}",
    ]  # fmt: skip
    with daemon(args, f"{base}/-/ready", tmp_path / "prometheus.log"):
        api = Api(base)
        deadline = time.monotonic() + 30
        while len(api.query("up")) < 2 or not api.query('ALERTS{alertname="Watchdog"}'):
            assert time.monotonic() < deadline, "no scrape or rule evaluation within 30s"
            time.sleep(0.5)
        yield api, port


def test_status_rows_from_prometheus(prometheus: tuple[Api, int]) -> None:
    api, port = prometheus
    rows = {row.job: row for row in collect_status(api, {"127.0.0.1": "controller"})}
    assert set(rows) == {"prometheus", "node"}
    assert rows["prometheus"].health == "ok" and rows["prometheus"].host == "controller"
    assert rows["prometheus"].instance == f"127.0.0.1:{port}"
    assert rows["node"].health == "down" and not rows["node"].up
    # TargetDown waits 3 minutes: pending, so not listed as firing yet.
    assert rows["node"].alerts == []
    assert rows["node"].as_dict()["health"] == "down"


def test_console_page_renders(prometheus: tuple[Api, int]) -> None:
    api, _ = prometheus
    with urllib.request.urlopen(f"{api.base_url}/consoles/imcloud.html", timeout=10) as resp:
        page = resp.read().decode()
    assert "<h1>imcloud overview</h1>" in page
    assert "1 down" in page and "gone" in page
    assert "error executing template" not in page
