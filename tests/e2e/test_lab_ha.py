"""Profile ha end to end on three real Debian 12 lab hosts: install, verify, failover drills.

Every host is app, db (etcd + Patroni) and cache (Redis + Sentinel); node1 and
node2 are the load balancers sharing the floating address, node3 the monitoring
host. One lab serves every drill: each drill leaves the cloud healthy (the next
one refuses to start otherwise), so they run in file order on the same cloud.
Each drill breaks its target under load through the floating address and must
lose no acked message and leave nothing behind on the host; the figures (RTO,
detection, p99) are printed for docs/benchmarks.md, not asserted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from installer.core import drill
from installer.core.cloud import Cloud, Host, init_cloud
from installer.core.config import parse_config
from installer.core.drill import run_drill
from installer.core.drill_report import drill_report
from installer.core.ha_state import probe, run_script
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
#: Bound on the wait for an interrupted drill to restore and its host to be healthy again.
SETTLE_TIMEOUT_S = 180


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


def leftovers(host: Host) -> list[str]:
    """What a drill could have left on the host: its nft table, drop-ins, watchdog units."""
    script = (
        f"nft list table inet {drill.NFT_TABLE} >/dev/null 2>&1 && echo 'nft table'\n"
        f"ls /run/systemd/system/*.d/{drill.DROPIN} 2>/dev/null\n"
        "systemctl list-units --all --no-legend 'imcloud-drill-*' 2>/dev/null\n"
    )
    code, out, err = run_script(host, script)
    assert code in (0, 1), err
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("target", "mode"),
    [("app", "kill"), ("db", "kill"), ("cache", "kill"), ("lb", "kill"),
     ("app", "stop"), ("app", "partition")],
)  # fmt: skip
def test_failover_drill_loses_no_acked_message(cloud: Cloud, target: str, mode: str) -> None:
    result = run_drill(cloud, target=target, mode=mode, rate=DRILL_RATE, duration=DRILL_DURATION_S)
    figures = result.to_dict()
    print(f"drill {target} {mode}: {json.dumps(figures, default=str)}")
    assert result.figures.acked > DRILL_RATE, figures  # the load really ran
    assert result.figures.acked_lost == 0, figures
    # 0 lost, duplicated, reordered or undelivered; detected, recovered, rejoined healthy
    assert result.ok, result.problems
    assert leftovers(next(h for h in cloud.hosts if h.name == result.host)) == []
    state = probe(cloud)
    assert state.problems == [], state.problems


def test_an_interrupted_partition_is_undone(cloud: Cloud) -> None:
    command = [sys.executable, "-m", "installer", "drill", "failover", "--target", "app",
               "--mode", "partition", "--rate", "5", "--duration", "60", "--cloud", str(cloud.dir)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)  # fmt: skip
    assert proc.stderr is not None
    broken = None
    deadline = time.monotonic() + 90
    try:
        for line in proc.stderr:
            if "drill: fault: partition " in line:
                broken = line.split("drill: fault: partition ", 1)[1].split()[0]
                break
            assert time.monotonic() < deadline, "no fault within 90 s"
        assert broken is not None
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    host = next(h for h in cloud.hosts if h.name == broken)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (leftovers(host) or probe(cloud).problems) and time.monotonic() < deadline:
        time.sleep(2)
    assert leftovers(host) == []
    assert probe(cloud).problems == []


def test_report_tables_and_plots_every_drill(cloud: Cloud) -> None:
    report = drill_report(cloud)
    assert [(d["target"], d["mode"]) for d in report.drills][:6] == [
        ("app", "kill"), ("db", "kill"), ("cache", "kill"), ("lb", "kill"),
        ("app", "stop"), ("app", "partition"),
    ]  # fmt: skip
    for path in report.plots.values():
        assert Path(path).read_bytes()[:4] == b"\x89PNG"


def test_cloud_verifies_after_the_drills(cloud: Cloud) -> None:
    report = run_verify(cloud)
    assert report.ok, "\n".join(report.failure_lines()) + "\n" + log_tail(report.log_path, 60)
