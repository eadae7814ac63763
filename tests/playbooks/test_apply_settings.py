"""playbooks/library/imcloud_apply_settings.py: restarts follow the files, not handlers.

The module runs for real (ad-hoc ansible, local connection) against a settings
file in a temporary directory; a fake ``systemctl`` first on PATH logs what it
is asked to do. The lab test (tests/e2e) does the same with a real service.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = str(Path(sys.executable).with_name("ansible"))

FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "{log}"
case "$*" in
  "is-active --quiet "*) test ! -e "{tmp}/stopped-$3";;
  "is-enabled --quiet "*) test ! -e "{tmp}/disabled-$3";;
  start\\ *) rm -f "{tmp}/stopped-$2";;
  enable\\ *) rm -f "{tmp}/disabled-$2";;
  *broken*) echo "Job for broken.service failed." >&2; exit 1;;
esac
"""


class Host:
    """A settings file, a fake systemctl and the module run against them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.settings = tmp_path / "etc" / "svc.conf"
        self.settings.parent.mkdir()
        self.log = tmp_path / "systemctl.log"
        self.log.touch()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL.format(log=self.log, tmp=tmp_path))
        (bin_dir / "systemctl").chmod(0o755)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "ANSIBLE_LIBRARY": str(REPO / "playbooks" / "library"),
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
            "ANSIBLE_LOCALHOST_WARNING": "0",
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        }

    def run(self, services: list[dict[str, Any]], *, check: bool = False) -> dict[str, Any]:
        """Run the module once; return its result and forget the systemctl calls seen so far."""
        self.log.write_text("")
        args = {"services": services, "state_dir": str(self.tmp / "applied")}
        cmd = [ANSIBLE, "localhost", "-c", "local", "-m", "ansible.legacy.imcloud_apply_settings",
               "-a", json.dumps(args)] + (["--check"] if check else [])  # fmt: skip
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
        # What systemctl was asked to do (the is-active / is-enabled queries left out).
        calls = self.log.read_text().splitlines()
        result["systemctl"] = [c for c in calls if not c.startswith("is-")]
        return result


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_a_setting_written_by_an_aborted_run_is_applied_by_the_next_run(host: Host) -> None:
    service = [{"name": "svc", "paths": [str(host.settings)]}]
    host.settings.write_text("listen=10.0.0.5:9100\n")
    first = host.run(service)
    assert first["changed"] and first["systemctl"] == ["daemon-reload", "restart svc"]
    again = host.run(service)
    assert not again["changed"] and again["systemctl"] == []

    # The aborted run: the new file is on the host, the run died before any restart.
    host.settings.write_text("listen=10.0.0.6:9100\n")
    # A handler-based role sees the file unchanged on the next run and never restarts;
    # this run must.
    next_run = host.run(service)
    assert next_run["changed"] and next_run["systemctl"] == ["daemon-reload", "restart svc"]
    assert host.run(service)["systemctl"] == []


def test_reload_restart_order_and_check_mode(host: Host) -> None:
    flags = host.tmp / "etc" / "svc.default"
    services = [
        {"name": "svc", "action": "reloaded", "paths": [str(host.settings)]},
        {"name": "svc", "action": "restarted", "paths": [str(flags)]},
        {"name": "other", "action": "reloaded", "paths": [str(host.settings)]},
    ]
    host.settings.write_text("a\n")
    flags.write_text("ARGS=\n")
    would = host.run(services, check=True)
    assert would["changed"] and would["systemctl"] == []
    assert would["applied"] == ["reloaded svc", "restarted svc", "reloaded other"]
    # The restart reads every file: svc is not reloaded on top of it.
    assert host.run(services)["systemctl"] == [
        "daemon-reload", "restart svc", "reload-or-restart other",
    ]  # fmt: skip
    host.settings.write_text("b\n")
    assert host.run(services)["systemctl"] == ["reload-or-restart svc", "reload-or-restart other"]


def test_a_failed_restart_is_retried_and_force_restarts(host: Host) -> None:
    host.settings.write_text("x\n")
    broken = [{"name": "broken", "paths": [str(host.settings)]}]
    failed = host.run(broken)
    assert failed.get("failed") and "journalctl -u broken" in failed["msg"]
    assert host.run(broken)["systemctl"] == ["daemon-reload", "restart broken"]

    service = [{"name": "svc", "paths": [str(host.settings)]}]
    host.run(service)
    assert host.run([{**service[0], "force": True}])["systemctl"] == [
        "daemon-reload",
        "restart svc",
    ]


def test_stopped_or_disabled_units_are_started_and_enabled(host: Host) -> None:
    service = [{"name": "svc", "paths": [str(host.settings)]}]
    host.settings.write_text("x\n")
    host.run(service)
    (host.tmp / "stopped-svc").touch()
    (host.tmp / "disabled-svc").touch()
    result = host.run(service)
    assert result["applied"] == ["started svc", "enabled svc"]
    assert result["systemctl"] == ["start svc", "enable svc"]
    assert host.run(service)["changed"] is False


def test_a_symlink_counts_by_its_target(host: Host) -> None:
    releases = host.tmp / "releases"
    (releases / "1").mkdir(parents=True)
    (releases / "2").mkdir()
    current = host.tmp / "current"
    current.symlink_to(releases / "1")
    service = [{"name": "svc", "paths": [str(current)]}]
    host.run(service)
    assert host.run(service)["systemctl"] == []
    current.unlink()
    current.symlink_to(releases / "2")
    assert host.run(service)["systemctl"] == ["daemon-reload", "restart svc"]
