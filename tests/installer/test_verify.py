"""`imcloud verify`: the design tables, result handling, and a real run of the shipped
suite against a host that is not there (everything must fail, clearly, and be logged)."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

from typer.testing import CliRunner

from installer.cli import app
from installer.core import verify
from installer.core.cloud import Cloud, init_cloud
from installer.core.config import parse_config
from installer.core.secrets import ensure_ca
from tests.installer.layouts import HA

runner = CliRunner()


def _cloud(tmp_path: Path, data: dict[str, object]) -> Cloud:
    cloud, _ = init_cloud(tmp_path / "cloud", parse_config(data))
    return cloud


CLUSTER = {
    "domain": "chat.example.com",
    "profile": "cluster",
    "hosts": [
        {"name": "lb1", "address": "192.0.2.10", "roles": ["lb"]},
        {"name": "app1", "address": "192.0.2.11", "roles": ["app"]},
        {"name": "app2", "address": "192.0.2.12", "roles": ["app"]},
        {
            "name": "data1",
            "address": "192.0.2.13",
            "internal_address": "10.0.0.13",
            "roles": ["db", "cache", "monitoring"],
        },
    ],
}


def test_expectations_follow_roles_and_monitoring(tmp_path: Path) -> None:
    cloud = _cloud(tmp_path, CLUSTER)
    lb1, app1, _, data1 = cloud.hosts
    assert verify.expected_services(cloud, app1) == [
        "nftables",
        "imcloud-im-server",
        "prometheus-node-exporter",
    ]
    assert {"postgresql@15-main", "redis-server", "prometheus", "prometheus-alertmanager"} <= set(
        verify.expected_services(cloud, data1)
    )
    assert verify.public_ports(lb1) == {22, 80, 443}
    assert verify.public_ports(app1) == {22}
    assert verify.internal_ports(cloud, lb1) == {9100, 9113, 3903}
    assert verify.internal_ports(cloud, app1) == {8080, 9100}
    assert {5432, 6379, 9090, 9093} <= verify.internal_ports(cloud, data1)


def test_without_a_monitoring_host_no_exporters_are_expected(tmp_path: Path) -> None:
    hosts = [dict(h) for h in CLUSTER["hosts"]]  # type: ignore[call-overload]
    hosts[3]["roles"] = ["db", "cache"]
    cloud = _cloud(tmp_path, {**CLUSTER, "hosts": hosts})
    app1 = cloud.hosts[1]
    assert verify.expected_services(cloud, app1) == ["nftables", "imcloud-im-server"]
    assert verify.internal_ports(cloud, app1) == {8080}


def _result(outcome: str, message: str = "") -> verify.CheckResult:
    return verify.CheckResult(
        area="services",
        check="service_running_and_enabled[app1-nginx]",
        target="app1",
        outcome=outcome,
        message=message,
        duration_s=0.1,
        nodeid="test_services.py::x",
    )


def test_report_summarises_failures_and_renders_json(tmp_path: Path) -> None:
    line = json.dumps(_result("failed", "nginx on app1: inactive").__dict__)
    parsed = verify.parse_result_line(line)
    assert parsed == _result("failed", "nginx on app1: inactive")
    assert verify.parse_result_line(line[:10]) is None

    report = verify.VerifyReport(
        results=[_result("passed"), _result("skipped", "no monitoring"), parsed],
        log_path=tmp_path / "v.log",
        duration_s=3.0,
        returncode=1,
    )
    assert not report.ok
    assert report.counts() == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert report.failure_lines() == [
        "app1: services/service_running_and_enabled[app1-nginx]: nginx on app1: inactive"
    ]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["counts"]["failed"] == 1
    assert len(data["results"]) == 3

    passing = verify.VerifyReport([_result("passed")], tmp_path / "v.log", 1.0, 0)
    assert passing.ok
    crashed = verify.VerifyReport([], tmp_path / "v.log", 1.0, 4)
    assert not crashed.ok
    assert "pytest exit 4" in crashed.failure_lines()[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_verify_against_an_absent_host_fails_every_host_check_and_logs(tmp_path: Path) -> None:
    cloud = _cloud(
        tmp_path,
        {
            "domain": "chat.example.com",
            "ssh": {"port": _closed_port(), "strict_host_key_checking": False},
            "hosts": [{"name": "ghost", "address": "127.0.0.1"}],
        },
    )
    result = runner.invoke(app, ["verify", "--cloud", str(cloud.dir), "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is False
    by_area: dict[str, list[dict[str, str]]] = {}
    for r in data["results"]:
        by_area.setdefault(r["area"], []).append(r)
    # every area of the suite ran, and every check that needs the host failed
    assert {"services", "sockets", "exposure", "tls", "secrets", "monitoring"} <= set(by_area)
    for r in by_area["services"] + by_area["sockets"]:
        assert r["target"] == "ghost" and r["outcome"] in ("failed", "error"), r
    tls = by_area["tls"][0]
    assert "cannot reach https://chat.example.com at 127.0.0.1:443" in tls["message"]
    # the controller-side secret files are private even though the host is absent
    controller = [r for r in by_area["secrets"] if r["target"] == "controller"]
    assert [r["outcome"] for r in controller] == ["passed"]
    assert "verify failed" in result.stderr
    assert "ghost: services/service_running_and_enabled[ghost-nginx]" in result.stderr
    log = Path(data["log"])
    assert log.parent == cloud.logs_dir
    assert "test_services.py" in log.read_text()


def test_controller_secret_modes_are_checked(tmp_path: Path) -> None:
    """The controller-side test fails when the vault password file is opened up."""
    cloud = _cloud(
        tmp_path, {"domain": "chat.example.com", "hosts": [{"name": "a", "address": "127.0.0.1"}]}
    )
    cloud.vault_password_path.chmod(0o640)
    streamed: list[verify.CheckResult] = []
    report = verify.run_verify(
        cloud, on_result=streamed.append, extra_args=["-k", "controller_vault"]
    )
    assert [r.outcome for r in report.results] == ["failed"]
    assert streamed == report.results
    assert ".vault-pass" in report.results[0].message


def _ca_subjects(context: ssl.SSLContext) -> list[str]:
    return [repr(ca["subject"]) for ca in context.get_ca_certs()]


def test_acme_trusts_the_acme_bundle_never_the_internal_ca(tmp_path: Path) -> None:
    ensure_ca(tmp_path / "acme-ca", "acme.example.test")
    bundle = tmp_path / "acme-ca" / "ca.crt"
    acme = {
        "mode": "acme",
        "acme_directory_url": "https://acme.example/dir",
        "acme_email": "o@x.io",
    }
    internal = _cloud(tmp_path / "internal", CLUSTER)
    private = _cloud(tmp_path / "private", {**CLUSTER, "tls": {**acme, "acme_ca_bundle": bundle}})
    public = _cloud(tmp_path / "public", {**CLUSTER, "tls": acme})

    internal_ca = _ca_subjects(verify.cloud_tls_context(internal))
    assert len(internal_ca) == 1
    assert private.tls_trust_anchor == bundle
    assert _ca_subjects(verify.cloud_tls_context(private)) == _ca_subjects(
        ssl.create_default_context(cafile=str(bundle))
    )
    assert public.tls_trust_anchor is None
    assert not set(internal_ca) & set(_ca_subjects(verify.cloud_tls_context(public)))



def test_profile_ha_expects_patroni_etcd_sentinel_and_keepalived(tmp_path: Path) -> None:
    cloud = _cloud(tmp_path, HA)
    n1, _, n3 = cloud.hosts
    services = verify.expected_services(cloud, n1)
    assert {"etcd", "patroni", "redis-sentinel", "keepalived", "nginx"} <= set(services)
    assert "postgresql@15-main" not in services
    assert "keepalived" not in verify.expected_services(cloud, n3)
    assert {2379, 2380, 2381, 8008, 26379, 9122, 5432, 6379} <= verify.internal_ports(cloud, n1)
    assert cloud.lb_address == "10.0.0.100"
