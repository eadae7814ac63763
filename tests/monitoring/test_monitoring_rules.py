"""The shipped Prometheus rules: valid, tested by promtool, and uniformly annotated."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "monitoring/prometheus/rules").glob("*.yml"))
RULE_TESTS = sorted((ROOT / "monitoring/tests").glob("*-test.yml"))
PREFIXES = ("ImServer", "Postgres", "Patroni", "Etcd", "Redis", "Nginx", "Node", "Tls", "Blackbox")
UNPREFIXED = {"TargetDown", "Watchdog"}

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"  # from scripts/setup.sh


def _alert_rules() -> list[dict]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=ROOT / "monitoring/tests",
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_promtool_accepts_every_rule_file() -> None:
    result = _run("check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_tests_pass(test_file: Path) -> None:
    result = _run("test", "rules", test_file.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_detects_a_wrong_expectation(tmp_path: Path) -> None:
    """Guard against a test harness that passes whatever the rules do."""
    broken = yaml.safe_load((ROOT / "monitoring/tests/redis-test.yml").read_text())
    broken["rule_files"] = [str(ROOT / "monitoring/prometheus/rules/redis.yml")]
    broken["tests"][0]["alert_rule_test"][1]["exp_alerts"] = []
    path = tmp_path / "broken-test.yml"
    path.write_text(yaml.safe_dump(broken))
    result = _run("test", "rules", str(path))
    assert result.returncode != 0


def _rule_id(rule: dict) -> str:
    return f"{rule['alert']}-{rule['labels']['severity']}"


@pytest.mark.parametrize("rule", _alert_rules(), ids=_rule_id)
def test_alert_has_labels_annotations_and_runbook(rule: dict) -> None:
    name = rule["alert"]
    assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), "alert names are CamelCase"
    assert name in UNPREFIXED or name.startswith(PREFIXES), f"{name} lacks a component prefix"
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    notes = rule["annotations"]
    assert set(notes) == {"summary", "description", "runbook_url"}
    assert "{{" not in notes["summary"] and notes["summary"].endswith(".")
    assert "{{ $labels" in notes["description"] or name == "Watchdog"
    assert notes["runbook_url"] == f"docs/runbooks/{name}.md"
    runbook = ROOT / notes["runbook_url"]
    assert runbook.is_file(), f"missing {runbook}"
    assert runbook.read_text().startswith(f"# {name}\n")


def test_pairs_share_a_name_and_differ_in_severity() -> None:
    seen: dict[str, list[str]] = {}
    for rule in _alert_rules():
        seen.setdefault(rule["alert"], []).append(rule["labels"]["severity"])
    for name, severities in seen.items():
        assert len(severities) == len(set(severities)), f"{name}: severity repeated"


def test_every_alert_has_firing_and_quiet_cases() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet - {"Watchdog"} == set(), "alerts never tested quiet"
    severities = {
        (a["alertname"], e["exp_labels"]["severity"])
        for path in RULE_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        for a in case.get("alert_rule_test", [])
        for e in a["exp_alerts"]
    }
    wanted = {(r["alert"], r["labels"]["severity"]) for r in _alert_rules()}
    assert wanted - severities == set(), "a severity of a pair is never tested firing"


def test_no_runbook_without_alert() -> None:
    names = {rule["alert"] for rule in _alert_rules()}
    runbooks = {p.stem for p in (ROOT / "docs/runbooks").glob("*.md")} - {"README"}
    assert runbooks - names == set()
    index = (ROOT / "docs/runbooks/README.md").read_text()
    assert {n for n in names if f"[{n}]({n}.md)" not in index} == set(), "README index is stale"
