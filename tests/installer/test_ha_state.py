"""ha_state: parsing of patronictl, Sentinel and `ip -br addr` output, and the judging of a
probe's answers into problems (pure; the probe itself runs in the drill's lab test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from installer.core import ha_state
from installer.core.cloud import Cloud
from installer.core.config import parse_config
from tests.installer.layouts import HA

CLUSTER: dict[str, Any] = {
    "domain": "chat.example.com",
    "profile": "cluster",
    "hosts": [
        {"name": "edge", "address": "10.0.0.1", "roles": ["lb", "db", "cache", "monitoring"]},
        {"name": "app1", "address": "10.0.0.2", "roles": ["app"]},
        {"name": "app2", "address": "10.0.0.3", "roles": ["app"]},
    ],
}

PATRONI = json.dumps([
    {"Cluster": "imcloud", "Member": "n1", "Host": "10.0.0.1", "Role": "Leader",
     "State": "running", "TL": 3},
    {"Cluster": "imcloud", "Member": "n2", "Host": "10.0.0.2:5432", "Role": "Sync Standby",
     "State": "streaming", "TL": 3, "Lag in MB": 0},
    {"Cluster": "imcloud", "Member": "n3", "Host": "10.0.0.3", "Role": "Replica",
     "State": "streaming", "TL": 3, "Lag in MB": "unknown"},
])  # fmt: skip
# What Patroni 3.0.2 (Debian 12) lists: replicas are "running"; a lag shows they replay.
PATRONI_30 = json.dumps([
    {"Cluster": "imcloud", "Member": "n1", "Host": "10.0.0.1", "Role": "Leader",
     "State": "running", "TL": 1},
    {"Cluster": "imcloud", "Member": "n2", "Host": "10.0.0.2", "Role": "Sync Standby",
     "State": "running", "TL": 1, "Lag in MB": 0},
    {"Cluster": "imcloud", "Member": "n3", "Host": "10.0.0.3", "Role": "Replica",
     "State": "running", "TL": 1, "Lag in MB": "unknown"},
])  # fmt: skip
IP_BR = (
    "lo               UNKNOWN        127.0.0.1/8 ::1/128 \n"
    "eth0@if24        UP             10.0.0.1/24 10.0.0.100/32 fe80::1/64 \n"
)


def _cloud(data: dict[str, Any]) -> Cloud:
    return Cloud(Path("/nonexistent"), parse_config(data))


def test_patroni_members_are_parsed_and_normalised() -> None:
    members = ha_state.parse_patroni_members(PATRONI)
    assert [(m.name, m.host, m.role, m.state) for m in members] == [
        ("n1", "10.0.0.1", "leader", "running"),
        ("n2", "10.0.0.2", "sync_standby", "streaming"),
        ("n3", "10.0.0.3", "replica", "streaming"),
    ]
    assert members[1].lag_mb == 0 and members[2].lag_mb is None and members[0].timeline == 3
    with pytest.raises(ValueError):
        ha_state.parse_patroni_members('{"not": "a list"}')


@pytest.mark.parametrize(
    ("output", "master"),
    [
        ("10.0.0.2\n6379\n", "10.0.0.2"),
        ("fd00::2\n6379", "fd00::2"),
        ("", None),
        ("(nil)\n", None),
        ("AUTH failed: WRONGPASS invalid username-password pair\n", None),
        ("Could not connect to Redis at 10.0.0.2:26379: Connection refused\n", None),
    ],
)
def test_sentinel_master_answer(output: str, master: str | None) -> None:
    assert ha_state.parse_sentinel_master(output) == master


def test_ip_addresses_drop_prefix_lengths() -> None:
    assert ha_state.parse_ip_addresses(IP_BR) == {
        "127.0.0.1", "::1", "10.0.0.1", "10.0.0.100", "fe80::1",
    }  # fmt: skip


def test_majority_master_needs_more_than_half() -> None:
    assert ha_state.majority_master({"n1": "n2", "n2": "n2", "n3": None}) == "n2"
    assert ha_state.majority_master({"n1": "n2", "n2": "n1", "n3": None}) is None
    assert ha_state.majority_master({"n1": None}) is None


def _answers(cloud: Cloud, **override: dict[str, str] | str) -> dict[str, dict[str, str] | str]:
    """Healthy answers of every host (n1 holds the address, n1 is the Redis master)."""
    answers: dict[str, dict[str, str] | str] = {}
    for host in cloud.hosts:
        units = ha_state.expected_units(host, cloud.config.profile == "ha")
        answers[host.name] = {
            "units": "\n".join("active" for _ in units),
            "readyz": '200 {"status":"ready"}',
            "sentinel": "10.0.0.1\n6379",
            "addresses": IP_BR if host.name == "n1" else "eth0 UP 10.0.0.2/24",
            "end": "",
        }
    answers.update(override)
    return answers


def test_a_healthy_ha_cloud_has_no_problems() -> None:
    cloud = _cloud(HA)
    state = ha_state.evaluate(cloud, _answers(cloud), PATRONI)
    assert state.problems == []
    assert (state.patroni_leader, state.redis_master, state.floating_holder) == ("n1",) * 3
    assert state.units["n3"] == {
        "imcloud-im-server.service": "active",
        "patroni.service": "active",
        "redis-server.service": "active",
        "redis-sentinel.service": "active",
    }
    assert state.to_dict()["patroni_leader"] == "n1"


def test_ha_problems_name_the_host_and_the_part() -> None:
    cloud = _cloud(HA)
    answers = _answers(cloud)
    n2 = dict(answers["n2"])  # type: ignore[arg-type]
    n2.update(
        units="active\nfailed\nactive\nactive\nactive\nactive",
        readyz='503 {"status":"unavailable","problems":["postgresql: OSError"]}',
        sentinel="10.0.0.2\n6379",
        addresses=IP_BR,
    )
    answers["n2"] = n2
    answers["n3"] = "no answer over SSH (Connection timed out)"
    patroni = json.dumps([
        {"Member": "n1", "Host": "10.0.0.1", "Role": "Leader", "State": "running"},
        {"Member": "n2", "Host": "10.0.0.2", "Role": "Replica", "State": "stopped"},
    ])  # fmt: skip
    problems = ha_state.evaluate(cloud, answers, patroni).problems
    assert "n2: imcloud-im-server.service is failed" in problems
    assert any(p.startswith("n2: IM server not ready (503") for p in problems)
    assert "n3: no answer over SSH (Connection timed out)" in problems
    assert "Sentinels disagree on the Redis master: n1 names n1, n2 names n2, n3 names None" in (
        problems
    )
    assert "floating address 10.0.0.100 is on several lb hosts: n1, n2" in problems
    assert "Patroni: n3 is not a member" in problems
    assert "Patroni: n2 (replica) is stopped, not streaming" in problems
    assert "Patroni: no synchronous standby" in problems


def test_patroni_and_floating_address_missing() -> None:
    cloud = _cloud(HA)
    answers = _answers(cloud)
    n1 = dict(answers["n1"])  # type: ignore[arg-type]
    n1["addresses"] = "eth0 UP 10.0.0.1/24"
    answers["n1"] = n1
    problems = ha_state.evaluate(cloud, answers, None).problems
    assert problems == [
        "floating address 10.0.0.100 is on no lb host",
        "Patroni: no db host answered `patronictl list`",
    ]
    two_leaders = json.dumps([
        {"Member": n, "Host": "x", "Role": "Leader", "State": "running"} for n in ("n1", "n2", "n3")
    ])  # fmt: skip
    assert "Patroni: 3 leaders (n1, n2, n3)" in ha_state.evaluate(
        cloud, _answers(cloud), two_leaders
    ).problems


def test_cluster_clouds_have_no_ha_parts() -> None:
    cloud = _cloud(CLUSTER)
    answers = _answers(cloud)
    state = ha_state.evaluate(cloud, answers, None)
    assert state.problems == []
    assert state.patroni is None and state.sentinels is None and state.floating_holders is None
    assert state.app_ready == {"app1": "", "app2": ""}
    assert state.units["edge"] == {"nginx.service": "active"}
    # the probe script asks only what the profile has: no Sentinel, no patronictl
    script = ha_state.host_script(cloud, cloud.hosts[0], None)
    assert "redis-cli" not in script and "ip -br addr" not in script
    assert "systemctl is-active nginx.service" in script


def test_the_sentinel_password_goes_through_the_environment_quoted() -> None:
    cloud = _cloud(HA)
    script = ha_state.host_script(cloud, cloud.hosts[0], "s3cr'et")
    assert "REDISCLI_AUTH='s3cr'\"'\"'et' redis-cli --tls --cacert /etc/imcloud/tls/ca.crt" in (
        script
    )
    assert " -a " not in script and "--pass" not in script


def test_patroni_30_replicas_are_running_and_healthy_only_with_a_known_lag() -> None:
    members = ha_state.parse_patroni_members(PATRONI_30)
    assert ha_state.patroni_problems(members[:2], ["n1", "n2"]) == []
    assert ha_state.patroni_problems(members, ["n1", "n2", "n3"]) == [
        "Patroni: n3 (replica) is running with unknown lag, not streaming"
    ]
