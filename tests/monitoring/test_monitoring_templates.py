"""The monitoring role's configs, rendered by Ansible and checked by the real validators."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml
from monhelpers import ROOT, ha_inventory, inventory

RECEIVERS = [
    {"name": "ops-webhook", "type": "webhook", "url": "https://hooks.example.test/alert"},
    {
        "name": "ops-mail",
        "type": "email",
        "to": "ops@example.test",
        "smarthost": "mail.example.test:587",
        "auth_username": "alerts",
        "auth_password": "s3cret",
    },
]

Render = Callable[..., dict[str, Path]]


def test_alertmanager_routes_every_alert_to_every_receiver(render: Render) -> None:
    files = render(inventory(receivers=RECEIVERS))
    check = subprocess.run(
        ["amtool", "check-config", str(files["alertmanager"])], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load(files["alertmanager"].read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers) == {"blackhole", "watchdog", "ops-webhook", "ops-mail"}
    assert receivers["ops-webhook"]["webhook_configs"][0]["url"] == RECEIVERS[0]["url"]
    mail = receivers["ops-mail"]["email_configs"][0]
    assert (mail["to"], mail["smarthost"], mail["from"]) == (
        "ops@example.test", "mail.example.test:587", "imcloud@chat.example.test",
    )  # fmt: skip
    assert mail["require_tls"] is True and mail["auth_password"] == "s3cret"
    assert "webhook_configs" not in receivers["watchdog"]

    routes = config["route"]["routes"]
    assert routes[0] == {
        "receiver": "watchdog", "matchers": ['alertname = "Watchdog"'], "repeat_interval": "1m",
    }  # fmt: skip
    fan_out = [r for r in routes if r.get("continue")]
    assert [r["receiver"] for r in fan_out] == ["ops-webhook", "ops-mail"]
    assert all("matchers" not in r for r in fan_out), "fan-out routes must match every alert"
    tests = [r for r in routes if 'alertname = "ImcloudTestAlert"' in r.get("matchers", [])]
    assert [r["receiver"] for r in tests] == ["ops-webhook", "ops-mail", "blackhole"]
    inhibit = config["inhibit_rules"][0]
    assert inhibit["equal"] == ["alertname", "instance"]
    assert inhibit["source_matchers"] == ['severity = "critical"']


def test_alertmanager_without_receivers_and_with_a_heartbeat(render: Render) -> None:
    files = render(inventory(), monitoring_alertmanager_watchdog_url="https://hb.example.test/ping")
    config = yaml.safe_load(files["alertmanager"].read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers) == {"blackhole", "watchdog"}
    assert receivers["watchdog"]["webhook_configs"][0]["url"] == "https://hb.example.test/ping"
    assert config["route"]["receiver"] == "blackhole"


def _targets(prometheus_yml: Path) -> dict[str, list[tuple[str, str]]]:
    config = yaml.safe_load(prometheus_yml.read_text())
    return {
        job["job_name"]: sorted(
            (t, sc["labels"]["host"]) for sc in job["static_configs"] for t in sc["targets"]
        )
        for job in config["scrape_configs"]
    }


def test_prometheus_targets_follow_the_inventory(render: Render) -> None:
    two = _targets(render(inventory(app_hosts=2))["prometheus"])
    assert two["im_server"] == [("10.9.0.31:8080", "app1"), ("10.9.0.32:8080", "app2")]
    assert two["postgres"] == [("10.9.0.20:9187", "data1")]
    assert two["redis"] == [("10.9.0.20:9121", "data1")]
    assert two["nginx"] == [("10.9.0.10:9113", "lb1")]
    assert two["nginx_log"] == [("10.9.0.10:3903", "lb1")]
    assert len(two["node"]) == 4
    assert two["blackbox_https"] == [("https://10.9.0.10/healthz", "lb1")]
    assert two["blackbox_wss"] == [("10.9.0.10:443", "lb1")]

    three = _targets(render(inventory(app_hosts=3))["prometheus"])
    assert three["im_server"][-1] == ("10.9.0.33:8080", "app3")
    assert ("10.9.0.33:9100", "app3") in three["node"]


def test_rules_file_holds_every_shipped_rule_group_unchanged(render: Render) -> None:
    """The role installs monitoring/prometheus/rules/*.yml merged into one file."""
    shipped = [
        group
        for path in sorted((ROOT / "monitoring/prometheus/rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
    ]
    installed = yaml.safe_load(render(inventory())["rules"].read_text())["groups"]
    assert installed == shipped
    assert any("{{ $labels" in str(group) for group in installed), "templates must stay verbatim"


def test_prometheus_listens_internally_under_a_route_prefix(render: Render) -> None:
    files = render(inventory())
    config = yaml.safe_load(files["prometheus"].read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    manager = config["alerting"]["alertmanagers"][0]
    assert manager["path_prefix"] == "/alertmanager"
    assert manager["static_configs"][0]["targets"] == ["10.9.0.20:9093"]
    blackbox = yaml.safe_load(files["blackbox"].read_text())["modules"]
    assert blackbox["https_healthz"]["http"]["headers"]["Host"] == "chat.example.test"
    assert "ca_file" not in blackbox["https_healthz"]["http"]["tls_config"]  # provided mode
    send = blackbox["wss_upgrade"]["tcp"]["query_response"][0]["send"]
    assert send.startswith("GET /ws HTTP/1.1\r\nHost: chat.example.test\r\n")


def _jobs(prometheus_yml: Path) -> dict[str, dict]:
    config = yaml.safe_load(prometheus_yml.read_text())
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_ha_scrapes_patroni_etcd_and_sentinels_and_probes_the_floating_address(
    render: Render,
) -> None:
    ca = "/etc/ssl/certs/ca-certificates.crt"  # promtool and blackbox check the file exists
    files = render(ha_inventory(), monitoring_internal_ca_file=ca, monitoring_blackbox_ca_file=ca)
    targets = _targets(files["prometheus"])
    nodes = [("10.9.1.11", "node1"), ("10.9.1.12", "node2"), ("10.9.1.13", "node3")]
    assert targets["patroni"] == [(f"{a}:8008", h) for a, h in nodes]
    assert targets["etcd"] == [(f"{a}:2381", h) for a, h in nodes]
    assert targets["sentinel"] == [(f"{a}:9122", h) for a, h in nodes]
    assert targets["postgres"] == [(f"{a}:9187", h) for a, h in nodes]
    jobs = _jobs(files["prometheus"])
    assert jobs["patroni"]["scheme"] == "https"
    assert jobs["patroni"]["tls_config"] == {"ca_file": ca}
    assert "scheme" not in jobs["etcd"] and "tls_config" not in jobs["sentinel"]
    # Clients reach the floating address; each lb is probed too (where it may move).
    assert targets["blackbox_https"] == [("https://10.9.1.250/healthz", "floating")]
    assert targets["blackbox_wss"] == [("10.9.1.250:443", "floating")]
    assert targets["blackbox_lb"] == [
        ("https://10.9.1.11/healthz", "node1"), ("https://10.9.1.12/healthz", "node2"),
    ]  # fmt: skip
    assert jobs["blackbox_lb"]["params"] == {"module": ["https_healthz"]}


def test_single_and_cluster_have_no_ha_jobs(render: Render) -> None:
    jobs = set(_jobs(render(inventory())["prometheus"]))
    assert jobs & {"patroni", "etcd", "sentinel", "blackbox_lb"} == set()
    assert {"blackbox_https", "blackbox_wss", "postgres", "redis"} <= jobs
