"""Fast checks of what the redis, keepalived and nginx roles render on profile ha
(and that single and cluster render as before).

The real proof is a lab: replication and the Sentinels' master, a failover that a
re-run of the role keeps, the floating address moving when nginx stops.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

from tests.playbooks.rendering import ROLES, render
from tests.playbooks.test_playbooks import (
    ANSIBLE_PLAYBOOK,
    CLUSTER,
    HA,
    PACKAGES_PLAY,
    ROLE_PACKAGES,
    SINGLE,
    _inventory,
    _run,
)


def _sha(secret: str) -> str:
    return hashlib.sha256(f"pw-{secret}".encode()).hexdigest()


@pytest.mark.parametrize(
    ("layout", "profile"), [(SINGLE, "single"), (CLUSTER, "cluster")], ids=["single", "cluster"]
)
def test_redis_off_ha_has_no_replication_users_or_settings(
    tmp_path: Path, layout: dict[str, tuple[list[str], str]], profile: str
) -> None:
    (tmp_path / "acl").mkdir()
    (tmp_path / "conf").mkdir()
    acls = render(tmp_path / "acl", layout, profile, "redis", "cache", template="users.acl.j2")
    confs = render(tmp_path / "conf", layout, profile, "redis", "cache", template="redis.conf.j2")
    for acl in acls.values():
        assert [line.split()[1] for line in acl.splitlines()] == ["default", "imcloud", "monitor"]
    for conf in confs.values():
        assert not re.search(r"^(replicaof|masteruser|masterauth|tls-replication)", conf, re.M)
        assert conf.rstrip().endswith("maxmemory-policy volatile-lru")


def test_redis_on_ha_seeds_every_host_but_the_master_as_its_replica(tmp_path: Path) -> None:
    rendered = render(
        tmp_path, HA, "ha", "redis", "cache", template="redis.conf.j2",
        extra={"__redis_seed_master": "10.0.0.22"},
    )  # fmt: skip
    assert sorted(rendered) == ["n1", "n2", "n3"]
    for host, conf in rendered.items():
        assert "\ntls-replication yes\nmasteruser replicator\n" in conf
        assert "\nmasterauth pw-imcloud_redis_replication_password\n" in conf
        assert f"\nreplica-announce-ip {HA[host][1]}\n" in conf
        replicaof = re.findall(r"^replicaof .*$", conf, re.M)
        assert replicaof == ([] if host == "n2" else ["replicaof 10.0.0.22 6379"]), host


def test_redis_on_ha_has_a_replication_and_a_sentinel_user_with_few_commands(
    tmp_path: Path,
) -> None:
    acl = render(tmp_path, HA, "ha", "redis", "cache", template="users.acl.j2")["n1"]
    users = {line.split()[1]: line for line in acl.splitlines()}
    assert sorted(users) == ["default", "imcloud", "monitor", "replicator", "sentinel"]
    assert users["replicator"] == (
        f"user replicator on #{_sha('imcloud_redis_replication_password')}"
        " -@all +psync +replconf +ping"
    )
    sentinel = users["sentinel"].split()
    password = f"#{_sha('imcloud_redis_sentinel_password')}"
    assert sentinel[:6] == ["user", "sentinel", "on", password, "&*", "-@all"]
    assert "~*" not in sentinel
    assert {"+slaveof", "+config|rewrite", "+client|kill", "+publish"} <= set(sentinel)


def test_sentinel_on_ha_listens_tls_only_and_watches_the_seed_master(tmp_path: Path) -> None:
    rendered = render(
        tmp_path, HA, "ha", "redis", "cache", template="sentinel.conf.j2",
        extra={"__redis_seed_master": "10.0.0.23"},
    )  # fmt: skip
    for host, conf in rendered.items():
        lines = set(conf.splitlines())
        password = "pw-imcloud_redis_sentinel_password"
        assert {
            f"bind {HA[host][1]} 127.0.0.1",
            "port 0",
            "tls-port 26379",
            "tls-replication yes",
            f"requirepass {password}",
            f"sentinel sentinel-pass {password}",
            f"sentinel announce-ip {HA[host][1]}",
            "sentinel monitor imcloud 10.0.0.23 6379 2",
            "sentinel auth-user imcloud sentinel",
            f"sentinel auth-pass imcloud {password}",
            "sentinel down-after-milliseconds imcloud 3000",
            "sentinel failover-timeout imcloud 10000",
        } <= lines, host
        monitor = conf.index("sentinel monitor imcloud")
        assert monitor < conf.index("sentinel auth-user imcloud")


def _answer(stdout: str, rc: int = 0) -> dict[str, Any]:
    return {"rc": rc, "stdout": stdout, "stdout_lines": stdout.splitlines()}


@pytest.mark.parametrize(
    ("answers", "master"),
    [
        ([_answer("", 124), _answer("10.0.0.23\n6379"), _answer("10.0.0.23\n6379")], "10.0.0.23"),
        ([_answer("10.0.0.21\n6379"), _answer("10.0.0.22\n6379"), _answer("10.0.0.22\n6379")],
         "10.0.0.22"),
        # one answer of three is no majority: no master from it (configure.yml refuses)
        ([_answer("NOAUTH Authentication required.", 1), _answer("10.0.0.22\n6379")], "10.0.0.21"),
        ([_answer("", 124), _answer("", 1), {"skipped": True}], "10.0.0.21"),
        (None, "10.0.0.21"),
    ],
    ids=["sentinels", "majority", "one-sentinel", "none-answer", "not-asked"],
)
def test_redis_master_is_the_sentinels_majority_else_the_first_cache_host(
    tmp_path: Path, answers: list[dict[str, Any]] | None, master: str
) -> None:
    extra = {} if answers is None else {"__redis_sentinel_answers": {"results": answers}}
    rendered = render(
        tmp_path, HA, "ha", "redis", "cache", variable="__redis_master_address", extra=extra
    )
    assert set(rendered.values()) == {master}


def test_keepalived_prefers_the_first_lb_and_peers_with_the_others(tmp_path: Path) -> None:
    rendered = render(tmp_path, HA, "ha", "keepalived", "lb", template="keepalived.conf.j2")
    assert sorted(rendered) == ["n1", "n2"]
    for host, peer, priority in (("n1", "10.0.0.22", 200), ("n2", "10.0.0.21", 190)):
        conf = rendered[host]
        compact = " ".join(conf.split())
        assert f"unicast_src_ip {HA[host][1]} unicast_peer {{ {peer} }}" in compact
        assert f"priority {priority} " in compact
        assert "state BACKUP nopreempt interface eth0 virtual_router_id 42 " in compact
        assert "auth_type PASS auth_pass 01234567 }" in compact
        assert "virtual_ipaddress { 10.0.0.100/32 dev eth0 }" in compact
        assert "script_user keepalived_script" in compact
        assert "track_script { imcloud_nginx }" in compact


@pytest.mark.parametrize(
    ("layout", "profile", "max_fails", "timeout"),
    [(HA, "ha", 1, "2s"), (CLUSTER, "cluster", 3, "5s")],
    ids=["ha", "cluster"],
)
def test_nginx_drops_a_dead_app_node_at_once_on_ha_only(
    tmp_path: Path,
    layout: dict[str, tuple[list[str], str]],
    profile: str,
    max_fails: int,
    timeout: str,
) -> None:
    rendered = render(tmp_path, layout, profile, "nginx", "lb", template="nginx.conf.j2")
    for conf in rendered.values():
        servers = re.findall(r"^\s*server (\S+):8080 max_fails=(\d+) ", conf, re.M)
        assert servers and {fails for _, fails in servers} == {str(max_fails)}
        assert f"proxy_connect_timeout {timeout};" in conf


def test_common_installs_the_packages_of_the_ha_roles(tmp_path: Path) -> None:
    role_packages = {
        **ROLE_PACKAGES,
        "keepalived": ("lb", "__keepalived_packages"),
    }
    files = [
        str(ROLES / role / kind / "main.yml")
        for role in ["common", *role_packages]
        for kind in ("defaults", "vars")
        if (ROLES / role / kind / "main.yml").is_file()
    ]
    play = tmp_path / "packages.yml"
    play.write_text(PACKAGES_PLAY.format(files=files, role_packages=role_packages))
    inventory = str(_inventory(tmp_path, HA, "ha"))
    no_timesync = '{"common_timesync_enabled": false}'
    proc = _run([ANSIBLE_PLAYBOOK, "-i", inventory, "-e", no_timesync, str(play)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
