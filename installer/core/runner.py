"""Run a playbook against a cloud with ansible-runner and follow it event by event.

The caller gets a live `RunState` (per host: current phase, counts; per phase:
wall-clock timing) through a callback, and a `RunResult` at the end. Every line
Ansible prints goes to a log file in the cloud's ``logs/`` directory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ansible_mitogen
import ansible_runner

from installer.core.cloud import Cloud
from installer.errors import ImcloudError
from installer.paths import playbooks_dir


@dataclass
class HostState:
    name: str
    phase: str = "waiting"
    task: str = ""
    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: bool = False


@dataclass
class PhaseTiming:
    name: str
    started: float
    finished: float

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass
class Failure:
    host: str
    task: str
    message: str


@dataclass
class RunState:
    """What the run has done so far; updated from ansible-runner's event stream."""

    hosts: dict[str, HostState]
    phases: dict[str, PhaseTiming] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    changes: list[tuple[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _touch_phase(self, name: str) -> None:
        now = time.monotonic()
        timing = self.phases.get(name)
        if timing is None:
            self.phases[name] = PhaseTiming(name, now, now)
        else:
            timing.finished = now

    def apply(self, event: dict[str, Any]) -> None:
        data = event.get("event_data") or {}
        kind = event.get("event", "")
        host_name: str = data.get("host") or ""
        phase = data.get("role") or data.get("play") or "setup"
        with self.lock:
            if kind in ("playbook_on_task_start", "runner_on_start"):
                self._touch_phase(phase)
            if kind == "playbook_on_stats":
                self._count_hidden_changes(data.get("changed") or {})
                return
            host = self.hosts.setdefault(host_name, HostState(host_name)) if host_name else None
            if host is None:
                return
            if kind == "runner_on_start":
                host.phase, host.task = phase, data.get("task", "")
            elif kind == "runner_on_ok":
                host.ok += 1
                if (data.get("res") or {}).get("changed"):
                    host.changed += 1
                    self.changes.append((host_name, data.get("task", "")))
                self._touch_phase(phase)
            elif kind == "runner_on_skipped":
                host.skipped += 1
            elif kind == "runner_on_failed" and not data.get("ignore_errors"):
                host.failed += 1
                self.failures.append(
                    Failure(host_name, data.get("task", ""), _failure_message(data))
                )
            elif kind == "runner_on_unreachable":
                host.unreachable = True
                self.failures.append(
                    Failure(host_name, data.get("task", ""), _failure_message(data))
                )


    def _count_hidden_changes(self, changed: dict[str, int]) -> None:
        """A `no_log` task's result arrives censored, `changed` included; the play's final
        stats still count it. Lock held by the caller."""
        for name, count in changed.items():
            host = self.hosts.setdefault(name, HostState(name))
            hidden = count - host.changed
            if hidden > 0:
                host.changed = count
                self.changes.append((name, f"{hidden} task(s) whose result is hidden (no_log)"))


def _failure_message(data: dict[str, Any]) -> str:
    res = data.get("res") or {}
    for key in ("msg", "stderr", "module_stderr", "stdout"):
        value = res.get(key)
        if value:
            text = value if isinstance(value, str) else json.dumps(value)
            return text.strip().splitlines()[-1][:400] if text.strip() else ""
    return "failed (no message)"


@dataclass
class RunResult:
    ok: bool
    status: str
    duration_s: float
    hosts: list[HostState]
    phases: list[PhaseTiming]
    failures: list[Failure]
    changes: list[tuple[str, str]]
    log_path: Path

    @property
    def changed(self) -> int:
        return sum(h.changed for h in self.hosts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "status": self.status,
            "duration_s": round(self.duration_s, 1),
            "changed": self.changed,
            "hosts": {
                h.name: {
                    "ok": h.ok,
                    "changed": h.changed,
                    "failed": h.failed,
                    "skipped": h.skipped,
                    "unreachable": h.unreachable,
                }
                for h in self.hosts
            },
            "phases": {p.name: round(p.seconds, 1) for p in self.phases},
            "failures": [f.__dict__ for f in self.failures],
            "changed_tasks": [{"host": h, "task": t} for h, t in self.changes],
            "log": str(self.log_path),
        }


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def ansible_env(cloud: Cloud) -> dict[str, str]:
    """Environment of ansible-playbook for this cloud (what ansible.cfg says for manual runs)."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_ROLES_PATH": str(playbooks_dir() / "roles"),
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_FORKS": "20",
        "ANSIBLE_HOST_KEY_CHECKING": str(cloud.config.ssh.strict_host_key_checking),
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=120s",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_LOCAL_TEMP": str(cloud.dir / ".ansible" / "tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(cloud.dir / ".ansible" / "cp"),
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
    }
    if cloud.config.ssh.mitogen:
        plugins = Path(ansible_mitogen.__file__).parent / "plugins"
        env["ANSIBLE_STRATEGY_PLUGINS"] = str(plugins / "strategy")
        env["ANSIBLE_STRATEGY"] = "mitogen_linear"
    return env


def run_playbook(
    cloud: Cloud,
    playbook: str,
    *,
    log_name: str,
    extra_vars: dict[str, Any] | None = None,
    tags: str | None = None,
    limit: str | None = None,
    on_update: Callable[[RunState], None] | None = None,
) -> RunResult:
    """Run ``playbooks/<playbook>`` with the cloud's inventory and vault secrets."""
    path = playbooks_dir() / playbook
    if not path.is_file():
        raise ImcloudError(f"playbook {path} is missing from this imcloud installation")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = cloud.logs_dir / f"{log_name}-{stamp}.log"
    private_dir = cloud.dir / ".runner"
    private_dir.mkdir(mode=0o700, exist_ok=True)
    cmdline = [
        "-e", f"@{cloud.secrets_path}",
        "--vault-password-file", str(cloud.vault_password_path),
    ]  # fmt: skip
    if extra_vars:
        cmdline += ["-e", json.dumps(extra_vars)]
    state = RunState(hosts={h.name: HostState(h.name) for h in cloud.hosts})

    with log_path.open("w") as log:
        log.write(f"# imcloud {log_name} {stamp}: ansible-playbook {playbook}\n")

        def handle(event: dict[str, Any]) -> bool:
            _write_event(log, event)
            state.apply(event)
            if on_update is not None:
                on_update(state)
            return True

        runner = ansible_runner.run(
            private_data_dir=str(private_dir),
            project_dir=str(playbooks_dir()),
            playbook=str(path),
            inventory=str(cloud.inventory_path),
            envvars=ansible_env(cloud),
            cmdline=shlex.join(cmdline),
            tags=tags,
            limit=limit,
            event_handler=handle,
            quiet=True,
            suppress_env_files=True,
            rotate_artifacts=3,
            ident=f"{log_name}-{stamp}",
        )
    status = runner.status
    ok = status == "successful" and runner.rc == 0 and not state.failures
    return RunResult(
        ok=ok,
        status=status,
        duration_s=time.monotonic() - state.started,
        hosts=list(state.hosts.values()),
        phases=sorted(state.phases.values(), key=lambda p: p.started),
        failures=state.failures,
        changes=state.changes,
        log_path=log_path,
    )


def _write_event(log: IO[str], event: dict[str, Any]) -> None:
    text = event.get("stdout")
    if text:
        log.write(text + "\n")
        log.flush()
