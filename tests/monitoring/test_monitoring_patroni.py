"""The Patroni and etcd scrape jobs and `imcloud status`'s ha part against a real Patroni.

Two Patroni 3.0 members (REST API over TLS, synchronous_mode) on 127.0.0.21
and .22 with one etcd, scraped by a real Prometheus like the monitoring role
configures it (job "patroni": https with the CA; job "etcd": the metrics port),
with the shipped rules. Needs Patroni (`patroni` on PATH or IMCLOUD_PATRONI, a
command line; IMCLOUD_PATRONI_PYTHONPATH is added to its PYTHONPATH), etcd
(`etcd` or IMCLOUD_ETCD) and PostgreSQL 15.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from monhelpers import certificates, daemon, free_port, processes, prometheus_args, wait_for

from im_server.localstack import PG_BIN
from installer.core.status import Api, HaRoles, collect_ha_roles, collect_status

PATRONI = os.environ.get("IMCLOUD_PATRONI") or shutil.which("patroni") or ""
ETCD = os.environ.get("IMCLOUD_ETCD") or shutil.which("etcd") or ""
MEMBERS = {"node1": "127.0.0.21", "node2": "127.0.0.22"}
NAMES = {address: name for name, address in MEMBERS.items()}

pytestmark = pytest.mark.skipif(
    not (PATRONI and ETCD and (PG_BIN / "postgres").exists()),
    reason="needs Patroni (IMCLOUD_PATRONI), etcd (IMCLOUD_ETCD) and PostgreSQL 15",
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory PostgreSQL may use: as root, owned by `postgres` (it refuses to run as root)."""
    d = Path(tempfile.mkdtemp(prefix="imcloud-patroni-"))
    if os.geteuid() == 0:
        os.chown(d, pwd.getpwnam("postgres").pw_uid, -1)
    yield d
    # A PostgreSQL whose Patroni died without stopping it must not outlive the test.
    for pid_file in d.glob("*/data/postmaster.pid"):
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "stop", "-m", "immediate",
                        "-D", str(pid_file.parent)], capture_output=True, timeout=60)  # fmt: skip
    shutil.rmtree(d, ignore_errors=True)


def _member_config(d: Path, name: str, api_port: int, pg_port: int, etcd_port: int) -> Path:
    address = MEMBERS[name]
    config = {
        "scope": "imcloud",
        "name": name,
        "restapi": {
            "listen": f"{address}:{api_port}", "connect_address": f"{address}:{api_port}",
            "certfile": str(d / "host.crt"), "keyfile": str(d / "host.key"),
            "authentication": {"username": "patroni", "password": "api-pw"},
        },
        "etcd3": {"hosts": f"127.0.0.21:{etcd_port}"},
        "bootstrap": {
            "dcs": {"ttl": 10, "loop_wait": 2, "retry_timeout": 3, "synchronous_mode": True},
            "initdb": [{"encoding": "UTF8"}],
        },
        "postgresql": {
            "listen": f"{address}:{pg_port}", "connect_address": f"{address}:{pg_port}",
            "data_dir": str(d / name / "data"), "bin_dir": str(PG_BIN),
            "pgpass": str(d / name / "pgpass"),
            "authentication": {
                "superuser": {"username": "postgres", "password": "super-pw"},
                "replication": {"username": "replicator", "password": "repl-pw"},
            },
            "parameters": {"unix_socket_directories": str(d / name)},
            "pg_hba": ["local all all trust",
                       "host replication replicator 127.0.0.0/8 scram-sha-256",
                       "host all all 127.0.0.0/8 scram-sha-256"],
        },
    }  # fmt: skip
    (d / name).mkdir()
    path = d / name / "patroni.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start_member(procs: dict[str, subprocess.Popen[bytes]], name: str, config: Path) -> None:
    env = dict(os.environ)
    if extra := os.environ.get("IMCLOUD_PATRONI_PYTHONPATH"):
        env["PYTHONPATH"] = extra
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    args = [*as_postgres, "env", f"PYTHONPATH={env.get('PYTHONPATH', '')}",
            *shlex.split(PATRONI), str(config)]  # fmt: skip
    with (config.parent / "patroni.log").open("wb") as log:
        procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def _is_primary(d: Path, address: str, api_port: int) -> bool:
    context = ssl.create_default_context(cafile=d / "ca.crt")
    try:
        with urllib.request.urlopen(f"https://{address}:{api_port}/primary", timeout=5,
                                    context=context) as resp:  # fmt: skip
            return bool(resp.status == 200)
    except OSError:
        return False


def _scrape_configs(d: Path, api_port: int, etcd_metrics_port: int) -> list[dict[str, Any]]:
    """Jobs "patroni" and "etcd" as the monitoring role renders them on profile ha."""
    patroni_targets = [
        {"targets": [f"{address}:{api_port}"], "labels": {"host": name}}
        for name, address in MEMBERS.items()
    ]
    return [
        {"job_name": "patroni", "scheme": "https",
         "tls_config": {"ca_file": str(d / "ca.crt")}, "static_configs": patroni_targets},
        {"job_name": "etcd", "static_configs": [
            {"targets": [f"127.0.0.21:{etcd_metrics_port}"], "labels": {"host": "node1"}}]},
    ]  # fmt: skip


def test_status_names_the_patroni_primary_and_sync_standby_across_a_switch(
    workdir: Path,
) -> None:
    d = workdir
    certificates(d, MEMBERS.values(), "db")
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres", str(d)], check=True)
    api_port, pg_port, prom_port = free_port(), free_port(), free_port()
    etcd_port, etcd_peer, etcd_metrics = free_port(), free_port(), free_port()
    with processes(stop_timeout=30) as procs:
        etcd = [
            ETCD, "--name", "e1", "--data-dir", str(d / "etcd"),
            "--listen-client-urls", f"http://127.0.0.21:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.21:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.21:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.21:{etcd_peer}",
            "--initial-cluster", f"e1=http://127.0.0.21:{etcd_peer}",
            "--listen-metrics-urls", f"http://127.0.0.21:{etcd_metrics}",
        ]  # fmt: skip
        with (d / "etcd.log").open("wb") as log:
            procs["etcd"] = subprocess.Popen(etcd, stdout=log, stderr=subprocess.STDOUT)
        configs = {n: _member_config(d, n, api_port, pg_port, etcd_port) for n in MEMBERS}
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres", str(d)], check=True)
        _start_member(procs, "node1", configs["node1"])
        wait_for("node1 bootstraps as primary",
                  lambda: _is_primary(d, MEMBERS["node1"], api_port))  # fmt: skip
        _start_member(procs, "node2", configs["node2"])

        base = f"http://127.0.0.1:{prom_port}/prometheus"
        prometheus = prometheus_args(d, prom_port, _scrape_configs(d, api_port, etcd_metrics))
        with daemon(prometheus, f"{base}/-/ready", d / "prometheus.log"):
            api = Api(base)

            def healthy() -> bool:
                roles = collect_ha_roles(api, NAMES)
                return roles.postgres_primary == ["node1"] and roles.postgres_sync_standby == [
                    "node2"
                ]

            wait_for("node1 primary, node2 sync standby", healthy)
            rows = {(r.job, r.host): r for r in collect_status(api, NAMES)}
            assert rows[("patroni", "node1")].figures == {"db up": "1", "role": "primary"}
            assert rows[("patroni", "node2")].figures == {"db up": "1", "role": "sync standby"}
            assert rows[("etcd", "node1")].figures == {"has leader": "1", "leader": "1"}
            assert all(r.health == "ok" for r in rows.values())

            # A stopped Patroni demotes its primary and releases the leader key.
            procs["node1"].terminate()
            procs["node1"].wait(timeout=60)
            def taken_over() -> HaRoles | None:
                roles = collect_ha_roles(api, NAMES)
                return roles if roles.postgres_primary == ["node2"] else None

            roles = wait_for("node2 takes over", taken_over)
            assert roles.postgres_sync_standby == []
            assert roles.problems[0] == "0 synchronous standbys (Patroni)"
