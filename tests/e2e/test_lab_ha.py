"""Profile ha end to end on three real Debian 12 lab hosts: install, verify, failover drills.

Every host is app, db (etcd + Patroni) and cache (Redis + Sentinel); node1 and
node2 are the load balancers sharing the floating address, node3 the monitoring
host. One lab serves every drill: each drill leaves the cloud healthy (the next
one refuses to start otherwise), so they run in file order on the same cloud.
Each drill kills its target under load through the floating address and must
lose no acked message; the figures (RTO, detection, p99) are printed for
docs/benchmarks.md, not asserted.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from installer.core.cloud import Cloud, init_cloud
from installer.core.config import parse_config
from installer.core.drill import run_drill
from installer.core.ha_state import probe
from installer.core.install import install
from installer.core.lab import Lab
from installer.core.quickstart import lab_cloud_config
from installer.core.runner import RunResult, log_tail
from installer.core.verify import run_verify
from installer.errors import ImcloudError

pytestmark = [pytest.mark.lab, pytest.mark.timeout(2400)]

LAB_NAME = "e2e-ha"
NODES = 3
DRILL_RATE = 40  # messages/s through the floating address
DRILL_DURATION_S = 25


@pytest.fixture(scope="module")
def cloud(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Cloud:
    data = lab_cloud_config(lab.hosts(), profile="ha")
    cloud, _ = init_cloud(tmp_path_factory.mktemp("ha-cloud"), parse_config(data))
    return cloud


def test_install_builds_the_ha_cloud(cloud: Cloud, explain: Callable[[RunResult], str]) -> None:
    result = install(cloud)
    print(f"ha install: {result.duration_s:.0f} s, phases {result.to_dict()['phases']}")
    assert result.ok, explain(result)


def test_second_install_changes_nothing(cloud: Cloud, explain: Callable[[RunResult], str]) -> None:
    result = install(cloud, preflight=False)
    print(f"second ha install: {result.duration_s:.0f} s")
    assert result.ok, explain(result)
    assert result.changes == [], f"not idempotent: {result.changes}"


def test_verify_checks_the_ha_shape(cloud: Cloud) -> None:
    report = run_verify(cloud)
    assert report.ok, "\n".join(report.failure_lines()) + "\n" + log_tail(report.log_path, 60)
    areas = {r.area for r in report.results}
    assert {"ha", "pool"} <= areas, areas


def test_drill_refuses_a_host_without_the_target_role(cloud: Cloud) -> None:
    with pytest.raises(ImcloudError, match="node3"):
        run_drill(
            cloud, target="lb", mode="kill", host="node3", rate=DRILL_RATE,
            duration=DRILL_DURATION_S,
        )
    assert probe(cloud).problems == []


@pytest.mark.parametrize("target", ["app", "db", "cache", "lb"])
def test_failover_drill_loses_no_acked_message(cloud: Cloud, target: str) -> None:
    result = run_drill(
        cloud, target=target, mode="kill", rate=DRILL_RATE, duration=DRILL_DURATION_S
    )
    figures = result.to_dict()
    print(f"drill {target} kill: {json.dumps(figures, default=str)}")
    assert result.figures.acked > DRILL_RATE, figures  # the load really ran
    assert result.figures.acked_lost == 0, figures
    # 0 lost, duplicated, reordered or undelivered; detected, recovered, rejoined healthy
    assert result.ok, result.problems
    state = probe(cloud)
    assert state.problems == [], state.problems


def test_cloud_verifies_after_the_drills(cloud: Cloud) -> None:
    report = run_verify(cloud)
    assert report.ok, "\n".join(report.failure_lines()) + "\n" + log_tail(report.log_path, 60)
