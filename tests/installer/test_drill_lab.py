"""`imcloud drill` end to end on a three-host lab with profile cluster (node1 lb, db, cache
and monitoring; node2 and node3 app): the app node drills by kill, stop and partition, an
interrupted drill that restores by itself, the refusals, and the report."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from installer.core import drill, ha_state
from installer.core.cloud import Cloud, Host, init_cloud
from installer.core.config import parse_config
from installer.core.drill_report import drill_report
from installer.core.install import install
from installer.core.lab import Lab
from installer.core.quickstart import lab_cloud_config
from installer.errors import ImcloudError

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                       reason="needs root and systemd-nspawn (bash scripts/setup.sh)"),
    pytest.mark.timeout(1500),
]

LAB_NAME = "hadrill"
RATE = 10.0
DURATION = 15.0
#: Bound on the wait for an interrupted drill to restore and its host to be healthy again.
SETTLE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    lab = Lab(LAB_NAME)
    try:
        hosts = lab.up(3)
        cloud, _ = init_cloud(
            tmp_path_factory.mktemp("hadrill") / "cloud", parse_config(lab_cloud_config(hosts))
        )
        result = install(cloud)
        assert result.ok, result.failures
        yield cloud
    finally:
        lab.down()


def leftovers(host: Host) -> list[str]:
    """What a drill could have left on the host: its nft table, drop-ins, watchdog units."""
    script = (
        f"nft list table inet {drill.NFT_TABLE} >/dev/null 2>&1 && echo 'nft table'\n"
        f"ls /run/systemd/system/*.d/{drill.DROPIN} 2>/dev/null\n"
        "systemctl list-units --all --no-legend 'imcloud-drill-*' 2>/dev/null\n"
    )
    code, out, err = ha_state.run_script(host, script)
    assert code in (0, 1), err
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("mode", drill.MODES)
def test_app_drill_loses_nothing_and_leaves_the_cloud_as_found(cloud: Cloud, mode: str) -> None:
    lines: list[str] = []
    result = drill.run_drill(
        cloud, target="app", mode=mode, rate=RATE, duration=DURATION, progress=lines.append
    )
    f = result.figures
    print(result.to_dict())
    assert result.ok, (result.problems, lines)
    assert result.host in ("node2", "node3")
    assert f.sent >= RATE * DURATION * 0.9 and f.acked == f.sent and f.delivered == f.acked
    assert (f.acked_lost, f.duplicates, f.reordered, f.undelivered) == (0, 0, 0, 0)
    assert result.detected_at_s is not None and result.rejoined_at_s is not None
    assert result.fault_at_s <= result.detected_at_s and result.restore_at_s is not None
    broken = next(h for h in cloud.hosts if h.name == result.host)
    assert leftovers(broken) == []
    assert ha_state.probe(cloud).problems == []
    assert (cloud.dir / "drills" / f"{result.id}.json").is_file()


@pytest.mark.parametrize("target", ["db", "cache", "lb"])
def test_faults_a_cluster_cannot_survive_are_refused(cloud: Cloud, target: str) -> None:
    with pytest.raises(ImcloudError, match=f"refusing to drill {target} on this cloud"):
        drill.run_drill(cloud, target=target, rate=RATE, duration=DURATION)


def test_bad_input_breaks_nothing(cloud: Cloud) -> None:
    with pytest.raises(ImcloudError, match="--host node1: has no role app"):
        drill.run_drill(cloud, target="app", host="node1")
    with pytest.raises(ImcloudError, match="--mode 'pause'"):
        drill.run_drill(cloud, target="app", mode="pause")
    assert ha_state.probe(cloud).problems == []


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
        assert broken in ("node2", "node3")
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
    while (leftovers(host) or ha_state.probe(cloud).problems) and time.monotonic() < deadline:
        time.sleep(2)
    assert leftovers(host) == []
    assert ha_state.probe(cloud).problems == []


def test_report_tables_and_plots_every_drill(cloud: Cloud) -> None:
    report = drill_report(cloud)
    assert [d["mode"] for d in report.drills] == list(drill.MODES)
    for path in report.plots.values():
        assert Path(path).read_bytes()[:4] == b"\x89PNG"
