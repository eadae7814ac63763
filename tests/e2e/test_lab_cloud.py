"""End to end on real Debian 12 lab hosts: check, install twice, verify, alerting.

Three hosts (node1: lb + db + cache + monitoring, node2 and node3: app). The
tests run in file order and share one lab and one cloud directory; the lab is
removed at the end, also when a test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from installer.core import lab_system
from installer.core.cloud import Cloud, init_cloud
from installer.core.config import parse_config
from installer.core.install import install
from installer.core.lab import Lab
from installer.core.preflight import check_cloud
from installer.core.quickstart import lab_cloud_config
from installer.core.runner import RunResult, log_tail
from installer.core.status import monitoring_apis
from installer.core.verify import run_verify
from installer.errors import ImcloudError
from installer.paths import playbooks_dir

pytestmark = [pytest.mark.lab, pytest.mark.timeout(2400)]

LAB_NAME = "e2e"
NODES = 3
ALERT_TIMEOUT_S = 60 + 120 + 30  # RedisDown's `for` + two minutes + scrape/eval slack
RESOLVE_TIMEOUT_S = 420  # Alertmanager sends the resolution at the group's next interval


class WebhookSink:
    """An Alertmanager webhook receiver on the controller's lab address."""

    def __init__(self, address: str) -> None:
        self.payloads: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if len(sink.payloads) < 1000:
                    sink.payloads.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.url = f"http://{address}:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        return [
            alert
            for payload in list(self.payloads)
            for alert in payload.get("alerts", [])
            if alert.get("labels", {}).get("alertname") == name and alert.get("status") == status
        ]

    def wait_for(self, name: str, status: str, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.alerts(name, status):
                return time.monotonic() - started
            time.sleep(2)
        seen = sorted(
            {
                (a.get("labels", {}).get("alertname"), a.get("status"))
                for p in self.payloads
                for a in p.get("alerts", [])
            }
        )
        raise AssertionError(f"{name} {status} not received within {timeout:.0f} s; seen: {seen}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sink(lab: Lab) -> Iterator[WebhookSink]:
    sink = WebhookSink(lab.controller_address())
    try:
        yield sink
    finally:
        sink.close()


@pytest.fixture(scope="module")
def cloud(lab: Lab, sink: WebhookSink, tmp_path_factory: pytest.TempPathFactory) -> Cloud:
    data = lab_cloud_config(lab.hosts())
    data["alerts"] = {"receivers": [{"name": "e2e-hook", "type": "webhook", "url": sink.url}]}
    cloud, _ = init_cloud(tmp_path_factory.mktemp("cloud"), parse_config(data))
    return cloud


def test_check_refuses_a_non_debian_host_and_install_changes_nothing(
    cloud: Cloud, ssh: Callable[[str, str], subprocess.CompletedProcess[str]]
) -> None:
    fake = "sed 's/^ID=debian/ID=ubuntu/' /usr/lib/os-release > /etc/os-release.fake && "
    fake += "mv /etc/os-release /etc/os-release.real && mv /etc/os-release.fake /etc/os-release"
    assert ssh("node3", fake).returncode == 0
    try:
        report = check_cloud(cloud)
        assert not report.ok
        lines = report.failure_lines()
        assert any(line.startswith("node3:") and "Debian" in line for line in lines), lines
        assert not any(line.startswith(("node1:", "node2:")) for line in lines), lines
        with pytest.raises(ImcloudError, match="preflight failed, nothing changed.*node3"):
            install(cloud)
        for node in ("node1", "node2", "node3"):
            assert ssh(node, "test -e /opt/imcloud || test -e /etc/nginx").returncode == 1
    finally:
        restore = "mv -f /etc/os-release.real /etc/os-release"
        assert ssh("node3", restore).returncode == 0


def test_check_names_an_unreachable_host(lab: Lab, cloud: Cloud, tmp_path: Path) -> None:
    data = lab_cloud_config(lab.hosts())
    ghost_address = lab.hosts()[-1].address.rsplit(".", 1)[0] + ".250"
    data["hosts"].append({"name": "ghost", "address": ghost_address, "roles": ["app"]})
    other, _ = init_cloud(tmp_path / "ghost-cloud", parse_config(data))
    report = check_cloud(other)
    failures = report.failure_lines()
    assert any(line.startswith("ghost:") for line in failures), failures
    assert all(line.startswith("ghost:") for line in failures), failures


def test_check_passes_on_the_fresh_hosts(cloud: Cloud) -> None:
    report = check_cloud(cloud)
    assert report.ok, "\n".join(report.failure_lines())


def test_install_brings_up_the_cloud(cloud: Cloud, explain: Callable[[RunResult], str]) -> None:
    result = install(cloud, preflight=False)
    print(f"first install: {result.duration_s:.0f} s, phases {result.to_dict()['phases']}")
    assert result.ok, explain(result)
    assert result.changed > 0


def test_second_install_changes_nothing(cloud: Cloud, explain: Callable[[RunResult], str]) -> None:
    result = install(cloud)
    print(f"second install: {result.duration_s:.0f} s")
    assert result.ok, explain(result)
    assert result.changes == [], f"not idempotent: {result.changes}"


def test_a_setting_left_by_an_aborted_install_is_applied_by_the_next_one(
    cloud: Cloud,
    ssh: Callable[[str, str], subprocess.CompletedProcess[str]],
    explain: Callable[[RunResult], str],
) -> None:
    """Issue #3: node exporter stayed on *:9100 after a run died before its restart handler."""
    settings = "/etc/default/prometheus-node-exporter"
    apply = {"services": [{"name": "prometheus-node-exporter", "paths": [settings]}]}
    wanted = ssh("node1", f"cat {settings}").stdout
    address = cloud.hosts_in("lb")[0].internal_address
    # An earlier install ran node exporter with Debian's default settings (all addresses).
    debian_default = f"cp {settings} /root/wanted && echo 'ARGS=\"\"' > {settings}"
    assert ssh("node1", debian_default).returncode == 0
    adhoc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible")), "node1", "-i", str(cloud.inventory_path),
         "-m", "ansible.legacy.imcloud_apply_settings", "-a", json.dumps(apply)],
        env={**os.environ, "ANSIBLE_LIBRARY": str(playbooks_dir() / "library")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert adhoc.returncode == 0, adhoc.stdout + adhoc.stderr
    # The aborted install wrote today's settings back and died before restarting.
    assert ssh("node1", f"mv /root/wanted {settings}").returncode == 0
    assert ssh("node1", f"cat {settings}").stdout == wanted
    listening = "ss -Hltn 'sport = :9100' | awk '{print $4}'"
    before = ssh("node1", listening).stdout.split()
    assert before and before != [f"{address}:9100"], before  # still on all addresses

    result = install(cloud, tags="exporters", preflight=False)
    assert result.ok, explain(result)
    assert ("node1", "Ensure each exporter runs, enabled on boot, with the settings on disk") in [
        (host, task.split(" : ")[-1].removeprefix("service | ")) for host, task in result.changes
    ], result.changes
    assert ssh("node1", listening).stdout.split() == [f"{address}:9100"]


def test_verify_passes(cloud: Cloud) -> None:
    report = run_verify(cloud)
    assert report.ok, "\n".join(report.failure_lines()) + "\n" + log_tail(report.log_path, 60)


def test_every_expected_target_is_up(cloud: Cloud) -> None:
    with monitoring_apis(cloud) as apis:
        up = apis.prometheus.query("up")
    by_job: dict[str, dict[str, float]] = {}
    for sample in up:
        by_job.setdefault(sample["metric"]["job"], {})[sample["metric"]["instance"]] = float(
            sample["value"][1]
        )
    down = {job: [i for i, v in inst.items() if v != 1] for job, inst in by_job.items()}
    assert not any(down.values()), f"targets down: {down}"
    apps = len(cloud.hosts_in("app"))
    assert len(by_job.get("im_server", {})) == apps, by_job.keys()
    assert len(by_job.get("node", {})) == len(cloud.hosts), by_job.keys()
    for job in ("postgres", "redis", "nginx"):
        assert len(by_job.get(job, {})) == 1, (job, sorted(by_job))


def test_redis_down_alert_reaches_the_webhook_and_resolves(
    cloud: Cloud, sink: WebhookSink, ssh: Callable[[str, str], subprocess.CompletedProcess[str]]
) -> None:
    cache = cloud.hosts_in("cache")[0].name
    assert ssh(cache, "systemctl stop redis-server").returncode == 0
    try:
        fired_after = sink.wait_for("RedisDown", "firing", ALERT_TIMEOUT_S)
        print(f"RedisDown reached the webhook {fired_after:.0f} s after redis stopped")
    finally:
        assert ssh(cache, "systemctl start redis-server").returncode == 0
    resolved_after = sink.wait_for("RedisDown", "resolved", RESOLVE_TIMEOUT_S)
    print(f"RedisDown resolved {resolved_after:.0f} s after redis started")


def test_lab_down_leaves_nothing_behind(lab: Lab) -> None:
    lab.down()
    assert not lab.status().exists
    assert lab_system.list_netns(f"imlab-{LAB_NAME}-") == []
    assert f"/labs/{LAB_NAME}/" not in Path("/proc/mounts").read_text()
    nspawn = subprocess.run(["pgrep", "-f", "systemd-nspawn"], capture_output=True, text=True)
    leftovers = [pid for pid in nspawn.stdout.split() if f"imlab-{LAB_NAME}-" in _cmdline(int(pid))]
    assert leftovers == []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""
