"""Fast checks of what the ha roles render (etcd, patroni, the IM server's settings).

The real proof is a lab: `patronictl list`, a failover, a second run changing
nothing (see the etcd and patroni roles).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.playbooks.rendering import ROLES, render
from tests.playbooks.test_playbooks import (
    ANSIBLE_PLAYBOOK,
    CLUSTER,
    HA,
    SINGLE,
    _inventory,
    _local_play,
    _run,
)


def _env(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )


def test_im_server_on_ha_lists_every_db_host_and_the_sentinels(tmp_path: Path) -> None:
    env = _env(render(tmp_path, HA, "ha", ["im_server"], "app", template="im_server.env.j2")["n2"])
    assert env["IM_DATABASE_URL"] == (
        "postgresql://imcloud:pw-imcloud_postgres_password@10.0.0.21:5432,10.0.0.22:5432,"
        "10.0.0.23:5432/imcloud?target_session_attrs=read-write&sslmode=verify-full"
        "&sslrootcert=/etc/imcloud/tls/ca.crt"
    )
    assert env["IM_REDIS_SENTINELS"] == "10.0.0.21:26379,10.0.0.22:26379,10.0.0.23:26379"
    assert env["IM_REDIS_SENTINEL_MASTER"] == "imcloud"
    assert env["IM_REDIS_SENTINEL_PASSWORD"] == "pw-imcloud_redis_sentinel_password"
    assert env["IM_REDIS_URL"] == "rediss://imcloud:pw-imcloud_redis_password@10.0.0.21:6379/0"


@pytest.mark.parametrize(
    ("layout", "profile"), [(SINGLE, "single"), (CLUSTER, "cluster")], ids=["single", "cluster"]
)
def test_im_server_off_ha_keeps_one_db_host_and_no_sentinels(
    tmp_path: Path, layout: dict[str, tuple[list[str], str]], profile: str
) -> None:
    rendered = render(tmp_path, layout, profile, ["im_server"], "app", template="im_server.env.j2")
    db = layout["one" if profile == "single" else "data1"][1]
    for text in rendered.values():
        env = _env(text)
        assert env["IM_DATABASE_URL"] == (
            f"postgresql://imcloud:pw-imcloud_postgres_password@{db}:5432/imcloud"
            "?sslmode=verify-full&sslrootcert=/etc/imcloud/tls/ca.crt"
        )
        assert not [name for name in env if name.startswith("IM_REDIS_SENTINEL")]


def test_etcd_members_bootstrap_one_cluster_over_tls(tmp_path: Path) -> None:
    rendered = render(tmp_path, HA, "ha", ["etcd"], "db", template="etcd.j2")
    assert sorted(rendered) == ["n1", "n2", "n3"]
    initial = "n1=https://10.0.0.21:2380,n2=https://10.0.0.22:2380,n3=https://10.0.0.23:2380"
    for host, text in rendered.items():
        env = _env(text)
        address = HA[host][1]
        assert env["ETCD_NAME"] == host
        assert env["ETCD_INITIAL_CLUSTER"] == initial
        assert (
            env["ETCD_LISTEN_CLIENT_URLS"]
            == env["ETCD_ADVERTISE_CLIENT_URLS"]
            == f"https://{address}:2379"
        )
        assert env["ETCD_LISTEN_PEER_URLS"] == f"https://{address}:2380"
        assert env["ETCD_LISTEN_METRICS_URLS"] == f"http://{address}:2381"
        assert env["ETCD_CLIENT_CERT_AUTH"] == env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"


def test_patroni_config_follows_the_ha_design(tmp_path: Path) -> None:
    rendered = render(tmp_path, HA, "ha", ["postgresql", "patroni"], "db", template="config.yml.j2")
    config = yaml.safe_load(rendered["n3"])
    assert (config["scope"], config["name"]) == ("imcloud", "n3")
    assert config["restapi"]["listen"] == "10.0.0.23:8008"
    assert config["restapi"]["authentication"] == {
        "username": "patroni",
        "password": "pw-imcloud_patroni_api_password",
    }
    assert config["etcd3"]["protocol"] == "https"
    assert config["etcd3"]["hosts"] == ["10.0.0.21:2379", "10.0.0.22:2379", "10.0.0.23:2379"]
    dcs = config["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (10, 2, 3)
    assert dcs["synchronous_mode"] is True and dcs["postgresql"]["use_pg_rewind"] is True
    assert dcs["postgresql"]["parameters"]["wal_log_hints"] == "on"
    pg = config["postgresql"]
    assert pg["data_dir"] == "/var/lib/postgresql/15/patroni"
    assert pg["connect_address"] == "10.0.0.23:5432"
    assert pg["authentication"]["superuser"]["password"] == "pw-imcloud_postgres_superuser_password"
    assert pg["authentication"]["replication"]["username"] == "replicator"
    assert pg["parameters"]["ssl"] == "on" and "shared_buffers" in pg["parameters"]
    hba = pg["pg_hba"]
    assert not [rule for rule in hba if rule.startswith("host ")], "only hostssl over TCP"
    for address in ("10.0.0.21", "10.0.0.22", "10.0.0.23"):
        assert f"hostssl replication replicator {address}/32 scram-sha-256" in hba
        assert f"hostssl imcloud imcloud {address}/32 scram-sha-256" in hba
    assert [r for r in hba if "imcloud_monitor" in r] == [
        "hostssl postgres,imcloud imcloud_monitor 10.0.0.23/32 scram-sha-256"
    ]


PACKAGES_PLAY = (
    _local_play("Check that the common role installs the ha roles' packages")
    + """\
    - name: Load the roles' defaults and vars
      ansible.builtin.include_vars:
        file: "{{{{ item }}}}"
      loop: {files}
    - name: The etcd and patroni roles' packages are in the common role's one apt transaction
      ansible.builtin.assert:
        that: >-
          (__etcd_packages + __patroni_packages + __postgresql_packages)
          is subset(__common_install_packages)
      when: inventory_hostname in groups['db']
"""
)


def test_common_installs_the_packages_of_etcd_and_patroni(tmp_path: Path) -> None:
    files = [
        str(ROLES / role / kind / "main.yml")
        for role in ("common", "postgresql", "etcd", "patroni")
        for kind in ("defaults", "vars")
    ]
    play = tmp_path / "packages.yml"
    play.write_text(PACKAGES_PLAY.format(files=files))
    inventory = str(_inventory(tmp_path, HA, "ha"))
    proc = _run(
        [ANSIBLE_PLAYBOOK, "-i", inventory, "-e", '{"common_timesync_enabled": false}', str(play)]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
