"""The drill's pure parts: figures from a timeline, option checks, refusals, fault scripts,
the record and its plot, and the CLI's one-line errors (nothing is broken anywhere)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from installer.cli import app
from installer.core import drill
from installer.core.cloud import Cloud, init_cloud
from installer.core.config import parse_config
from installer.core.drill_load import Attempt, Delivery, Reconnect, Timeline, measure, percentile
from installer.core.drill_report import drill_report, write_record
from installer.errors import ImcloudError
from tests.installer.layouts import HA

runner = CliRunner()

CLUSTER: dict[str, Any] = {
    "domain": "chat.example.com",
    "profile": "cluster",
    "hosts": [
        {"name": "edge", "address": "127.0.0.1", "roles": ["lb", "db", "cache", "monitoring"]},
        {"name": "app1", "address": "127.0.0.2", "roles": ["app"]},
        {"name": "app2", "address": "127.0.0.3", "roles": ["app"]},
    ],
}


def _cloud(data: dict[str, Any]) -> Cloud:
    return Cloud(Path("/nonexistent"), parse_config(data))


def _timeline() -> Timeline:
    """10 msg/s; fault at 2.0 s; attempts sent 2.0-3.5 s fail, retries from 4.0 s succeed."""
    t = Timeline(history={})
    for n in range(60):
        sent = n / 10
        t.sent += 1
        t.first_sent[n] = sent
        if 2.0 <= sent < 3.5:
            t.attempts.append(Attempt(n, sent, sent + 2.0, False, "app1", "TimeoutError"))
            retry = max(4.0, sent + 2.2)
            t.attempts.append(Attempt(n, retry, retry + 0.05, True, "app2"))
            done = retry + 0.05
        else:
            done = sent + 0.01
            t.attempts.append(Attempt(n, sent, done, True, "app1" if sent < 2 else "app2"))
        t.acked[n] = n + 1
        t.acked_at[n] = done
        t.history[n] = [n + 1]
    t.deliveries = [Delivery(n, n + 1, t.acked_at[n] + 0.01) for n in range(60)]
    t.reconnects = [Reconnect(3.9, "sender", "app2", False)]
    return t


def test_figures_of_a_fault_with_failures_and_recovery() -> None:
    f = measure(_timeline(), fault_at=2.0, window_end=7.0)
    assert (f.sent, f.acked, f.delivered) == (60, 60, 60)
    assert (f.acked_lost, f.undelivered, f.duplicates, f.reordered) == (0, 0, 0, 0)
    assert f.failed_attempts == 15
    assert f.first_failure_s == 2.0
    # the first attempt sent after 2.0 s that got an ack: the fresh send at 3.5 s
    assert f.recovered_s == pytest.approx(3.51)
    assert f.rto_s == pytest.approx(1.51)
    assert f.p99_before_ms == pytest.approx(10)
    assert f.p99_fault_ms == pytest.approx(2250)  # e.g. message 20: sent 2.0, acked 4.25


def test_lost_duplicated_reordered_and_undelivered_are_counted() -> None:
    t = _timeline()
    del t.history[5]  # acked, not stored: lost
    t.history[6] = [7, 61]  # one cid stored twice
    t.deliveries.append(Delivery(8, 9, 9.0))  # delivered again, and below the top seq
    t.deliveries = [d for d in t.deliveries if d.n != 9]  # never reached the receiver
    f = measure(t, fault_at=2.0, window_end=7.0)
    assert f.acked_lost == 1
    assert f.duplicates == 2
    assert f.reordered == 1
    assert f.undelivered == 1
    assert f.delivered == 59


def test_no_failure_is_an_rto_of_zero_and_no_recovery_an_infinite_one() -> None:
    t = Timeline(attempts=[Attempt(0, 0.0, 0.01, True, "a"), Attempt(1, 3.0, 3.01, True, "b")])
    assert measure(t, 2.0, 5.0).rto_s == 0.0
    t.attempts.append(Attempt(2, 4.0, 6.0, False, "b", "TimeoutError"))
    f = measure(t, 2.0, 5.0)
    assert math.isinf(f.rto_s) and f.recovered_s is None and f.first_failure_s == 4.0


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 99) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([float(v) for v in range(1, 101)], 99) == 99.0
    assert percentile([float(v) for v in range(1, 101)], 50) == 50.0


def test_app_detection_is_the_first_service_by_another_node() -> None:
    t = _timeline()
    assert drill.app_detection(t, 2.0, "app1") == pytest.approx(3.51)  # 3.5 s send on app2
    t.attempts = [a for a in t.attempts if a.node == "app1" or a.sent > 4]
    assert drill.app_detection(t, 2.0, "app1") == 3.9  # the reconnect to app2
    assert drill.app_detection(Timeline(), 2.0, "app1") is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target": "web"}, "--target 'web': one of app, db, cache, lb"),
        ({"mode": "reboot"}, "--mode 'reboot': one of kill, stop, partition"),
        ({"rate": 0.5}, "--rate 0.5: between 1 and 200 messages per second"),
        ({"rate": math.nan}, "--rate nan: between 1 and 200 messages per second"),
        ({"duration": 5}, "--duration 5: between 15 and 600 seconds"),
        ({"duration": 3600}, "--duration 3600: between 15 and 600 seconds"),
        ({"host": "node9"}, "--host node9: not a host of this cloud (edge, app1, app2)"),
        ({"host": "edge"}, "--host edge: has no role app (hosts with it: app1, app2)"),
    ],
)
def test_bad_options_are_one_clear_error(options: dict[str, object], message: str) -> None:
    given: dict[str, object] = {"target": "app", "mode": "kill", "host": None, "rate": 10,
                                "duration": 30, **options}  # fmt: skip
    with pytest.raises(ImcloudError) as caught:
        drill.check_options(_cloud(CLUSTER), **given)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_good_options_make_a_plan() -> None:
    plan = drill.check_options(_cloud(CLUSTER), "app", "partition", "app2", 10, 30)
    assert plan == drill.Plan("app", "partition", "app2", 10, 30)


def test_a_cluster_may_lose_an_app_node_but_not_its_db_cache_or_lb() -> None:
    cloud = _cloud(CLUSTER)
    refusals = {
        target: drill.refusal(cloud, drill.check_options(cloud, target, "kill", None, 10, 30))
        for target in drill.TARGET_UNITS
    }
    assert refusals["app"] is None
    assert refusals["db"] == (
        "refusing to drill db on this cloud: profile cluster has one unreplicated db host: "
        "losing it stops the cloud (use profile ha)"
    )
    assert refusals["cache"] is not None and "unreplicated cache host" in refusals["cache"]
    assert refusals["lb"] is not None and "1 host(s) with role lb, 2 needed" in refusals["lb"]
    ha = _cloud(HA)
    for target in drill.TARGET_UNITS:
        assert drill.refusal(ha, drill.check_options(ha, target, "kill", None, 10, 30)) is None


def test_fault_scripts_arm_the_watchdog_first_and_restore_alike() -> None:
    units = drill.TARGET_UNITS["lb"]
    kill = drill.fault_script("kill", units, "imcloud-drill-x", 120)
    lines = kill.splitlines()
    assert lines[0] == "set -e" and lines[1].startswith(
        "systemd-run --quiet --unit=imcloud-drill-x --on-active=120s"
    )
    assert "Restart=no" in kill and "/run/systemd/system/keepalived.service.d/" in kill
    assert lines[-1] == "systemctl kill --kill-whom=all -s SIGKILL nginx.service keepalived.service"
    restore = drill.restore_script("kill", units)
    assert restore.endswith("systemctl start nginx.service keepalived.service")
    assert "rm -f /run/systemd/system/nginx.service.d/imcloud-drill.conf" in restore
    partition = drill.fault_script("partition", units, "imcloud-drill-x", 120)
    assert "$family saddr $client tcp dport 22 accept" in partition
    assert "policy drop" in partition and f"table inet {drill.NFT_TABLE}" in partition
    assert "nft delete table inet imcloud_drill" in drill.restore_script("partition", units)
    assert drill.fault_script("stop", units, "x", 1).endswith(
        "systemctl stop nginx.service keepalived.service\n"
    )


def _result() -> drill.DrillResult:
    timeline = _timeline()
    timeline.marks = {"fault": 2.0, "detected": 3.9, "restore": 9.0, "rejoined": 12.0}
    return drill.DrillResult(
        id="20260101T000000Z-app-kill", started="2026-01-01T00:00:00+00:00",
        domain="chat.example.com", profile="cluster", target="app", mode="kill", host="app1",
        rate=10, duration_s=12.0, detection=drill.DETECTION["app"], fault_at_s=2.0,
        detected_at_s=3.9, restore_at_s=9.0, rejoined_at_s=12.0,
        figures=measure(timeline, 2.0, 14.0), timeline=timeline,
    )  # fmt: skip


def test_a_result_is_judged_and_serialised() -> None:
    result = _result()
    assert result.ok and result.detection_s == pytest.approx(1.9)
    data = result.to_dict()
    assert data["ok"] is True and data["rto_s"] == pytest.approx(1.51) and "timeline" not in data
    json.dumps(data)
    result.figures.acked_lost = 2
    result.rejoined_at_s = None
    assert drill.judge(result, "") == [
        "2 acked message(s) missing from the server's history",
        f"app1 did not rejoin as a healthy member within {drill.REJOIN_TIMEOUT_S:g} s",
    ]
    result.timeline.history = None  # the history could not be read after recovery
    result.figures = measure(result.timeline, 2.0, 14.0)
    assert result.figures.acked_lost is None
    assert drill.judge(result, "", "TimeoutError")[0] == (
        "the server's history could not be read after recovery (TimeoutError)"
    )


def test_report_lists_recorded_drills_and_plots_each(tmp_path: Path) -> None:
    cloud = Cloud(tmp_path, parse_config(CLUSTER))
    with pytest.raises(ImcloudError, match="no drill recorded"):
        drill_report(cloud)
    result = _result()
    write_record(cloud, result.to_dict(), result.timeline)
    report = drill_report(cloud)
    assert [d["id"] for d in report.drills] == [result.id]
    png = report.plots[result.id]
    assert png == tmp_path / "drills" / f"{result.id}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((tmp_path / "drills" / f"{result.id}.json").read_text())
    assert Timeline.from_dict(stored["timeline"]) == result.timeline


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster cloud whose hosts do not answer SSH (a closed port on loopback)."""
    data = {**CLUSTER, "ssh": {"port": _closed_port(), "strict_host_key_checking": False}}
    cloud, _ = init_cloud(tmp_path_factory.mktemp("drill") / "cloud", parse_config(data))
    return cloud.dir


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "web"], "--target 'web': one of app, db, cache, lb"),
        (["--target", "app", "--rate", "1000"], "--rate 1000: between 1 and 200"),
        (["--target", "db"], "refusing to drill db on this cloud: profile cluster has one"),
        (["--target", "app"], "the cloud is not healthy, nothing was broken: edge: no answer"),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(
    cluster_dir: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["drill", "failover", *args, "--cloud", str(cluster_dir)])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not (cluster_dir / "drills").exists()
