"""The exporters role's Sentinel exporter against real Redis Sentinels, read through Prometheus.

Three "cache hosts" on 127.0.0.11-13 (TLS everywhere, as on profile ha): Redis
master on .11, replica on .12, a Sentinel on each, and on each a
prometheus-redis-exporter started with the settings the exporters role renders.
A real Prometheus scrapes them as job "sentinel" with the shipped rules;
`imcloud status`'s ha part must name the master, and follow a failover.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from monhelpers import (
    ROOT,
    VENV_BIN,
    certificates,
    daemon,
    free_port,
    ha_inventory,
    processes,
    prometheus_args,
    wait_for,
)

from installer.core.status import Api, collect_ha_roles, collect_status

EXPORTER = os.environ.get("IMCLOUD_REDIS_EXPORTER") or shutil.which("prometheus-redis-exporter")
HOSTS = {"node1": "127.0.0.11", "node2": "127.0.0.12", "node3": "127.0.0.13"}
NAMES = {address: name for name, address in HOSTS.items()}
SENTINEL_PASSWORD = "sentinel-pw_Ab3-x9"  # like secrets.token_urlsafe
REDIS_SENTINEL_USER_PASSWORD = "acl-sentinel-pw"

pytestmark = pytest.mark.skipif(
    not EXPORTER or not shutil.which("redis-server"),
    reason="needs redis-server and prometheus-redis-exporter (or IMCLOUD_REDIS_EXPORTER)",
)


def _tls(d: Path) -> str:
    return (
        f"tls-cert-file {d / 'host.crt'}\ntls-key-file {d / 'host.key'}\n"
        f"tls-ca-cert-file {d / 'ca.crt'}\ntls-auth-clients no\ntls-replication yes\n"
    )


def _start(procs: dict[str, subprocess.Popen[bytes]], name: str, args: list[str], log: Path,
           env: dict[str, str] | None = None) -> None:  # fmt: skip
    with log.open("wb") as out:
        procs[name] = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def _render_exporters(work: Path, ca: Path, sentinel_port: int) -> Path:
    """The exporters role's settings for the three hosts, with the test's ports and CA."""
    inv = ha_inventory()
    hosts = inv["all"]["children"]["imcloud"]["hosts"]
    for name, address in HOSTS.items():
        hosts[name] = {"ansible_host": address, "imcloud_internal_address": address}
    inv["all"]["vars"] |= {
        "imcloud_redis_sentinel_password": SENTINEL_PASSWORD,
        "imcloud_postgres_monitor_password": "pg-monitor-pw",
    }
    (work / "inventory.yml").write_text(yaml.safe_dump(inv))
    # Extra vars: the role's defaults are play vars in render_exporters.yml.
    extra = {"out_dir": str(work / "out"), "roles_dir": str(ROOT / "playbooks/roles"),
             "exporters_tls_ca_file": str(ca), "exporters_sentinel_server_port": sentinel_port}
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(work / "inventory.yml"),
         str(ROOT / "tests/monitoring/render_exporters.yml"), "-e", json.dumps(extra)],
        capture_output=True, text=True, timeout=180,
        env={"ANSIBLE_NOCOLOR": "1", "PATH": f"{VENV_BIN}:/usr/bin:/bin",
             "ANSIBLE_LOCAL_TEMP": str(work / "tmp"), "HOME": str(work)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return work / "out"


def _settings(path: Path) -> dict[str, str]:
    """KEY=value lines of an /etc/default file, unquoted like systemd's EnvironmentFile."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0]
    return out


def test_rendered_postgres_exporter_reaches_the_local_server_on_every_db_host(
    tmp_path: Path,
) -> None:
    """Primary or replica, each db host's exporter reports its own PostgreSQL (loopback, TLS)."""
    out = _render_exporters(tmp_path, tmp_path / "ca.crt", 26379)
    for name in HOSTS:
        dsn = _settings(out / name / "prometheus-postgres-exporter.default")["DATA_SOURCE_NAME"]
        assert "@127.0.0.1:5432/postgres?sslmode=verify-full&sslrootcert=" in dsn
    unit = (out / "node1" / "prometheus-redis-sentinel-exporter.service").read_text()
    assert "EnvironmentFile=/etc/default/prometheus-redis-sentinel-exporter" in unit


def _sample_names(port: int, address: str) -> set[str]:
    """Names of the samples an exporter serves (none while it does not answer yet)."""
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return set()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def _start_redis_and_sentinels(
    procs: dict[str, subprocess.Popen[bytes]], d: Path, redis_port: int, sentinel_port: int
) -> None:
    """Redis master on node1, replica on node2, a Sentinel on every host (docs/ha.md)."""
    acl = (
        "user default on nopass ~* &* +@all\n"
        f"user sentinel on >{REDIS_SENTINEL_USER_PASSWORD} &* +@all\n"
    )
    for name in ("node1", "node2"):
        work = d / f"redis-{name}"
        work.mkdir()
        conf = (
            f"bind {HOSTS[name]}\nport 0\ntls-port {redis_port}\n{_tls(d)}save \"\"\n"
            f"dir {work}\nreplica-announce-ip {HOSTS[name]}\nrepl-diskless-sync-delay 0\n{acl}"
        )
        if name == "node2":
            conf += f"replicaof {HOSTS['node1']} {redis_port}\n"
        (work / "redis.conf").write_text(conf)
        _start(procs, f"redis-{name}", ["redis-server", str(work / "redis.conf")], work / "log")
    for name, address in HOSTS.items():
        work = d / f"sentinel-{name}"
        work.mkdir()
        (work / "sentinel.conf").write_text(
            f"bind {address}\nport 0\ntls-port {sentinel_port}\n{_tls(d)}dir {work}\n"
            f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            f"sentinel announce-ip {address}\n"
            f"sentinel monitor imcloud {HOSTS['node1']} {redis_port} 2\n"
            "sentinel auth-user imcloud sentinel\n"
            f"sentinel auth-pass imcloud {REDIS_SENTINEL_USER_PASSWORD}\n"
            "sentinel down-after-milliseconds imcloud 3000\n"
            "sentinel failover-timeout imcloud 10000\n"
        )
        args = ["redis-server", str(work / "sentinel.conf"), "--sentinel"]
        _start(procs, f"sentinel-{name}", args, work / "log")


def _start_exporters(
    procs: dict[str, subprocess.Popen[bytes]], rendered: Path, port: int, sentinel_port: int
) -> None:
    """Each host's exporter as the role's unit runs it (EnvironmentFile, then $ARGS)."""
    for name, address in HOSTS.items():
        settings = _settings(rendered / name / "prometheus-redis-sentinel-exporter.default")
        assert settings["REDIS_PASSWORD"] == SENTINEL_PASSWORD
        args = shlex.split(settings["ARGS"].replace(":9122", f":{port}"))
        assert f"-web.listen-address={address}:{port}" in args
        assert f"-redis.addr=rediss://{address}:{sentinel_port}" in args
        env = {"REDIS_PASSWORD": settings["REDIS_PASSWORD"]}
        _start(procs, f"exporter-{name}", [str(EXPORTER), *args],
               rendered / name / "exporter.log", env=env)  # fmt: skip


def test_sentinel_exporter_and_status_follow_a_failover(tmp_path: Path) -> None:
    certificates(tmp_path, HOSTS.values(), "cache")
    redis_port, sentinel_port, exporter_port, prom_port = (free_port() for _ in range(4))
    rendered = _render_exporters(tmp_path, tmp_path / "ca.crt", sentinel_port)
    everyone = list(HOSTS)
    with processes() as procs:
        _start_redis_and_sentinels(procs, tmp_path, redis_port, sentinel_port)
        _start_exporters(procs, rendered, exporter_port, sentinel_port)

        def sentinel_metrics() -> set[str]:
            names = _sample_names(exporter_port, HOSTS["node1"])
            return {n for n in names if n.startswith("redis_sentinel_master")}

        # The names the rules and `status` use (monitoring/prometheus/rules/sentinel.yml).
        exported = wait_for("redis_sentinel_master_* from node1's exporter", sentinel_metrics)
        assert {
            "redis_sentinel_master_status", "redis_sentinel_master_ok_sentinels",
            "redis_sentinel_master_ok_slaves", "redis_sentinel_master_ckquorum_status",
        } <= exported  # fmt: skip

        base = f"http://127.0.0.1:{prom_port}/prometheus"
        targets = [
            {"targets": [f"{address}:{exporter_port}"], "labels": {"host": name}}
            for name, address in HOSTS.items()
        ]
        prometheus = prometheus_args(
            tmp_path, prom_port, [{"job_name": "sentinel", "static_configs": targets}]
        )
        with daemon(prometheus, f"{base}/-/ready", tmp_path / "prometheus.log"):
            api = Api(base)

            def named_by_all() -> dict[str, list[str]] | None:
                masters = collect_ha_roles(api, NAMES).redis_master
                return masters if list(masters.values()) == [everyone] else None

            assert wait_for("every Sentinel names node1", named_by_all) == {"node1": everyone}
            with urllib.request.urlopen(f"{base}/consoles/imcloud.html", timeout=10) as resp:
                page = resp.read().decode()
            assert f"<td>{HOSTS['node1']}:{redis_port} (named by 3 Sentinels)</td>" in page
            assert "error executing template" not in page

            # Sentinels learn replicas from the master's INFO (every 10 s): one they
            # do not know yet could not be promoted.
            def sentinel_rows() -> dict[str, tuple[str, ...]] | None:
                rows = [r for r in collect_status(api, NAMES) if r.job == "sentinel"]
                figures = ("sentinel up", "ok sentinels", "ok replicas")
                found = {r.host: (r.health, *(r.figures.get(f, "") for f in figures))
                         for r in rows}  # fmt: skip
                return found if found == dict.fromkeys(everyone, ("ok", "1", "3", "1")) else None

            wait_for("three Sentinels that see each other and the replica", sentinel_rows)

            procs["redis-node1"].terminate()
            procs["redis-node1"].wait(timeout=10)
            moved = wait_for(
                "the Sentinels fail over to node2",
                lambda: (m := named_by_all()) and "node2" in m and m,
                timeout=90,
            )
            assert moved == {"node2": everyone}
