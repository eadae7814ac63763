"""Monitoring through nginx's authenticated /prometheus/ and /alertmanager/: every target up,
every shipped rule loaded, Alertmanager connected, the Watchdog alert firing end to end."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from installer.core.cloud import Cloud
from installer.core.verify import https_request
from installer.paths import monitoring_dir

pytestmark = pytest.mark.usefixtures("monitoring_required")

#: Right after an install, targets may not have been scraped and the Watchdog not yet sent;
#: the checks below share this much waiting in total, so a broken pipeline fails in bounded time.
SETTLE_S = 120
POLL_S = 5

Eventually = Callable[[Callable[[], str | None]], None]


@pytest.fixture(scope="module")
def api(cloud: Cloud, secrets: dict[str, str]) -> Callable[[str], Any]:
    auth = ("monitor", secrets["imcloud_monitoring_password"])

    def get(path: str) -> Any:
        status, body = https_request(cloud, "GET", path, basic=auth)
        detail = body.get("error", "") if isinstance(body, dict) else ""
        assert status == 200, f"GET {path} through nginx: HTTP {status} {detail}".strip()
        return body["data"] if isinstance(body, dict) and "data" in body else body

    return get


@pytest.fixture(scope="module")
def eventually() -> Eventually:
    """Poll a check that returns a problem (or None) until it passes or the module's shared
    settling time is used up."""
    deadline = time.monotonic() + SETTLE_S

    def wait(check: Callable[[], str | None]) -> None:
        while True:
            problem = check()
            if problem is None:
                return
            if time.monotonic() > deadline:
                pytest.fail(problem, pytrace=False)
            time.sleep(POLL_S)

    return wait


def test_every_prometheus_target_up(api: Callable[[str], Any], eventually: Eventually) -> None:
    def check() -> str | None:
        targets = api("/prometheus/api/v1/targets?state=active")["activeTargets"]
        if not targets:
            return "Prometheus has no active targets"
        down = [
            f"{t['labels'].get('job')}/{t['labels'].get('instance')}: {t['health']} "
            f"{t.get('lastError', '')}".strip()
            for t in targets
            if t["health"] != "up"
        ]
        return f"{len(down)} of {len(targets)} targets not up: " + "; ".join(down) if down else None

    eventually(check)


def test_every_shipped_rule_loaded(api: Callable[[str], Any]) -> None:
    shipped: set[str] = set()
    for path in sorted((monitoring_dir() / "prometheus" / "rules").glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            shipped.update(r.get("alert") or r.get("record") for r in group.get("rules", []))
    loaded: dict[str, Any] = {}
    for group in api("/prometheus/api/v1/rules")["groups"]:
        for rule in group["rules"]:
            loaded[rule["name"]] = rule
    missing = sorted(shipped - set(loaded))
    assert not missing, f"rules not loaded in Prometheus: {', '.join(missing)}"
    broken = sorted(f"{n}: {r.get('lastError')}" for n, r in loaded.items() if r["health"] == "err")
    assert not broken, f"rules failing to evaluate: {'; '.join(broken)}"


def test_alertmanager_reachable_from_prometheus(
    api: Callable[[str], Any], eventually: Eventually
) -> None:
    def check() -> str | None:
        active = api("/prometheus/api/v1/alertmanagers")["activeAlertmanagers"]
        return None if active else "Prometheus has no active Alertmanager"

    eventually(check)
    status = api("/alertmanager/api/v2/status")
    assert status["cluster"]["status"] in ("ready", "disabled"), status["cluster"]


def test_watchdog_firing_in_alertmanager(api: Callable[[str], Any], eventually: Eventually) -> None:
    def check() -> str | None:
        alerts = api("/alertmanager/api/v2/alerts?filter=alertname%3D%22Watchdog%22")
        if any(a["status"]["state"] == "active" for a in alerts):
            return None
        firing = api("/prometheus/api/v1/alerts")["alerts"]
        where = (
            "firing in Prometheus"
            if any(a["labels"].get("alertname") == "Watchdog" for a in firing)
            else "not firing in Prometheus either"
        )
        return f"Watchdog alert is not active in Alertmanager ({where})"

    eventually(check)
