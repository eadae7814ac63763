"""`imcloud drill failover`: break one part of a live cloud under IM load and measure.

Python API (what the CLI and the end-to-end tests call)::

    result = run_drill(cloud, target="app", mode="kill", rate=50, duration=30,
                       host=None, progress=print)          # -> DrillResult
    result.ok, result.figures.rto_s, result.to_dict()

A drill: check the options (:func:`check_options`), refuse a fault the layout
cannot survive (``config.survival_problems``) or a cloud that is not healthy now
(``ha_state.probe``), all before anything is broken. Then: two drill users send
through the public address (:mod:`installer.core.drill_load`); after
:data:`LEAD_S` the target is broken (:class:`Fault`), held broken until the cloud
recovered plus :data:`HOLD_AFTER_RECOVERY_S` (at most :data:`HOLD_CAP_S`),
restored; the load goes on to the planned duration (at least :data:`TAIL_S`
after the restore); the broken host must rejoin healthy (at most
:data:`REJOIN_TIMEOUT_S`); the server's history is read to find acked messages
it lost. The restore runs in ``finally`` (also on Ctrl-C), and a transient
systemd timer on the host (``imcloud-drill-<id>.timer``) restores by itself
should the controller vanish. The run is recorded in ``<cloud>/drills/``
(:mod:`installer.core.drill_report`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

import aiohttp

from im_server.client import ImError
from installer.core import ha_state
from installer.core.cloud import Cloud, Host
from installer.core.config import Role, survival_problems
from installer.core.drill_load import Endpoint, Figures, Load, Timeline, measure
from installer.core.drill_report import write_record
from installer.core.users import base_url, client_options
from installer.errors import ImcloudError

__all__ = [
    "DETECTION",
    "DrillResult",
    "Fault",
    "MODES",
    "Plan",
    "TARGET_UNITS",
    "app_detection",
    "check_options",
    "run_drill",
]

Progress = Callable[[str], None]

#: What each target breaks (docs/ha.md).
TARGET_UNITS: dict[str, tuple[str, ...]] = {
    "app": ("imcloud-im-server.service",),
    "db": ("patroni.service",),
    "cache": ("redis-server.service",),
    "lb": ("nginx.service", "keepalived.service"),
}
MODES = ("kill", "stop", "partition")
#: How detection is timed, per target (the report states it).
DETECTION: dict[str, str] = {
    "app": "first reconnect of a drill device, or first acked send, served by another app node",
    "db": "first poll (1 s) of patronictl on another db host naming a new Patroni leader",
    "cache": "first poll (1 s) in which most Sentinels on the other cache hosts name a new master",
    "lb": "first poll (1 s) of `ip -br addr` showing the floating address on another lb host",
}

RATE_BOUNDS = (1.0, 200.0)
DURATION_BOUNDS = (15.0, 600.0)
DEFAULT_RATE = 50.0
DEFAULT_DURATION = 30.0
LEAD_S = 5.0
HOLD_AFTER_RECOVERY_S = 5.0
HOLD_CAP_S = 60.0
#: Recovered: no failed attempt for this long, and an attempt sent after the last one acked.
QUIET_S = 1.0
TAIL_S = 5.0
REJOIN_TIMEOUT_S = 180.0
POLL_S = 1.0
#: The host's own restore fires this long after the hold cap, should the controller vanish.
WATCHDOG_MARGIN_S = 60.0
NFT_TABLE = "imcloud_drill"
DROPIN = "imcloud-drill.conf"


@dataclass(frozen=True)
class Plan:
    target: Role
    mode: str
    host: str | None
    rate: float
    duration: float


def check_options(
    cloud: Cloud, target: str, mode: str, host: str | None, rate: float, duration: float
) -> Plan:
    """Validate the drill's options against the cloud; ImcloudError on the first bad one."""
    if target not in TARGET_UNITS:
        raise ImcloudError(f"--target {target!r}: one of {', '.join(TARGET_UNITS)}")
    if mode not in MODES:
        raise ImcloudError(f"--mode {mode!r}: one of {', '.join(MODES)}")
    low, high = RATE_BOUNDS
    if not (math.isfinite(rate) and low <= rate <= high):
        raise ImcloudError(f"--rate {rate:g}: between {low:g} and {high:g} messages per second")
    low, high = DURATION_BOUNDS
    if not (math.isfinite(duration) and low <= duration <= high):
        raise ImcloudError(f"--duration {duration:g}: between {low:g} and {high:g} seconds")
    role = next(r for r in get_args(Role) if r == target)
    if host is not None:
        names = [h.name for h in cloud.hosts]
        if host not in names:
            raise ImcloudError(f"--host {host}: not a host of this cloud ({', '.join(names)})")
        carriers = [h.name for h in cloud.hosts_in(role)]
        if host not in carriers:
            raise ImcloudError(
                f"--host {host}: has no role {target} (hosts with it: {', '.join(carriers)})"
            )
    return Plan(role, mode, host, rate, duration)


def refusal(cloud: Cloud, plan: Plan) -> str | None:
    """Why this cloud's layout could not survive the fault, if it could not."""
    problems = survival_problems(cloud.config, roles=(plan.target,))
    if problems:
        return f"refusing to drill {plan.target} on this cloud: {problems[0]}"
    return None


def default_host(cloud: Cloud, target: Role, state: ha_state.HaState) -> str | None:
    """The host a target breaks by default: the Patroni leader, the Redis master, the floating
    address's holder; None for app (the node the sending device lands on)."""
    chosen = {
        "db": state.patroni_leader,
        "cache": state.redis_master,
        "lb": state.floating_holder,
    }.get(target)
    if target != "app" and chosen is None:
        raise ImcloudError(f"cannot tell which host to break for {target} (no single one leads)")
    return chosen


# -- faults ---------------------------------------------------------------------------


def fault_script(mode: str, units: tuple[str, ...], unit_id: str, watchdog_s: float) -> str:
    """Shell for the host: arm the watchdog, then break. ``$IMCLOUD_SSH_CLIENT`` is the
    controller (run_script sets it), whose SSH the partition lets through."""
    names = " ".join(units)
    watchdog = (
        f"systemd-run --quiet --unit={unit_id} --on-active={math.ceil(watchdog_s)}s "
        f"--timer-property=AccuracySec=1s /bin/sh -c {shlex.quote(restore_script(mode, units))}"
    )
    lines = ["set -e", watchdog]
    if mode == "kill":
        for unit in units:
            lines.append(f"mkdir -p /run/systemd/system/{unit}.d")
            lines.append(
                f"printf '[Service]\\nRestart=no\\n' > /run/systemd/system/{unit}.d/{DROPIN}"
            )
        lines += ["systemctl daemon-reload", f"systemctl kill --kill-whom=all -s SIGKILL {names}"]
    elif mode == "stop":
        lines.append(f"systemctl stop {names}")
    else:
        lines += [
            'client="${IMCLOUD_SSH_CLIENT%% *}"',
            '[ -n "$client" ] || { echo "no SSH_CLIENT: cannot keep SSH open" >&2; exit 1; }',
            'case "$client" in *:*) family=ip6 ;; *) family=ip ;; esac',
            "nft -f - <<EOF",
            f"table inet {NFT_TABLE} {{",
            "    chain input {",
            "        type filter hook input priority -10; policy drop;",
            '        iif "lo" accept',
            "        $family saddr $client tcp dport 22 accept",
            "    }",
            "    chain output {",
            "        type filter hook output priority -10; policy drop;",
            '        oif "lo" accept',
            "        $family daddr $client tcp sport 22 accept",
            "    }",
            "}",
            "EOF",
        ]
    return "\n".join(lines) + "\n"


def restore_script(mode: str, units: tuple[str, ...]) -> str:
    names = " ".join(units)
    if mode == "kill":
        dropins = " ".join(f"/run/systemd/system/{u}.d/{DROPIN}" for u in units)
        dirs = " ".join(f"/run/systemd/system/{u}.d" for u in units)
        return (
            f"rm -f {dropins}; rmdir {dirs} 2>/dev/null; systemctl daemon-reload; "
            f"systemctl reset-failed {names} 2>/dev/null; systemctl start {names}"
        )
    if mode == "stop":
        return f"systemctl start {names}"
    table = f"inet {NFT_TABLE}"
    return f"nft list table {table} >/dev/null 2>&1 && nft delete table {table}; true"


class Fault:
    """One fault on one host; :meth:`restore` is idempotent and safe from any thread."""

    def __init__(self, host: Host, mode: str, units: tuple[str, ...], drill_id: str) -> None:
        self.host = host
        self.mode = mode
        self.units = units
        self.unit_id = f"imcloud-drill-{drill_id}"
        self.applied = False
        self.restored = False
        self._lock = threading.Lock()

    def describe(self) -> str:
        units = " ".join(self.units)
        if self.mode == "partition":
            return f"partition {self.host.name} (all traffic but the controller's SSH dropped)"
        what = "SIGKILL (kept down)" if self.mode == "kill" else "systemctl stop"
        return f"{what} {units} on {self.host.name}"

    def apply(self) -> None:
        with self._lock:
            self.applied = True  # even a half-applied fault gets restored
            watchdog_s = HOLD_CAP_S + WATCHDOG_MARGIN_S
            script = fault_script(self.mode, self.units, self.unit_id, watchdog_s)
            code, _, err = ha_state.run_script(self.host, script, timeout=60)
        if code != 0:
            problem = self.restore()
            raise ImcloudError(
                f"breaking {self.host.name} failed ({err.strip() or f'exit {code}'})"
                + (f"; restore: {problem}" if problem else "; restored")
            )

    def restore(self) -> str:
        """Undo the fault and disarm the watchdog; '' on success, else what went wrong."""
        with self._lock:
            if not self.applied or self.restored:
                return ""
            script = (
                f"systemctl stop {self.unit_id}.timer 2>/dev/null; "
                f"systemctl reset-failed {self.unit_id}.service 2>/dev/null; "
                f"{restore_script(self.mode, self.units)}\n"
            )
            problem = ""
            for _ in range(3):
                code, _, err = ha_state.run_script(self.host, script, timeout=90)
                if code == 0:
                    self.restored = True
                    return ""
                problem = err.strip().splitlines()[-1] if err.strip() else f"exit {code}"
                time.sleep(2)
            return (
                f"restoring {self.host.name} failed ({problem}); "
                f"its watchdog {self.unit_id}.timer retries by itself"
            )


# -- results --------------------------------------------------------------------------


@dataclass
class DrillResult:
    id: str
    started: str  # ISO 8601, UTC
    domain: str
    profile: str
    target: str
    mode: str
    host: str
    rate: float
    duration_s: float  # of the load (the drill itself goes on until the host rejoined)
    detection: str  # how detection is timed
    fault_at_s: float  # seconds since the load started
    detected_at_s: float | None
    restore_at_s: float | None
    rejoined_at_s: float | None
    figures: Figures
    problems: list[str] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline, repr=False)

    @property
    def detection_s(self) -> float | None:
        return None if self.detected_at_s is None else self.detected_at_s - self.fault_at_s

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The figures (no time series: ``timeline.to_dict()`` has them)."""
        data = {k: v for k, v in self.__dict__.items() if k not in ("figures", "timeline")}
        data.update(self.figures.to_dict())
        data["detection_s"] = self.detection_s
        data["ok"] = self.ok
        if math.isinf(data["rto_s"]):
            data["rto_s"] = None  # no send succeeded after the first failure
        return data


def app_detection(timeline: Timeline, fault_at: float, broken: str) -> float | None:
    """When a drill device was first served by another app node than the broken one after the
    fault: a reconnect landing elsewhere, or an acked attempt sent after the fault."""
    moments = [r.at for r in timeline.reconnects if r.at >= fault_at and r.node != broken]
    moments += [
        a.done for a in timeline.attempts if a.ok and a.sent >= fault_at and a.node != broken
    ]
    return min(moments, default=None)


def judge(result: DrillResult, restore_problem: str, audit_error: str = "") -> list[str]:
    """What went wrong in a finished drill (empty: it passed)."""
    f = result.figures
    problems = []
    if restore_problem:
        problems.append(restore_problem)
    if f.acked_lost is None:
        problems.append(f"the server's history could not be read after recovery ({audit_error})")
    elif f.acked_lost:
        problems.append(f"{f.acked_lost} acked message(s) missing from the server's history")
    if f.duplicates:
        problems.append(f"{f.duplicates} duplicate(s)")
    if f.reordered:
        problems.append(f"{f.reordered} message(s) delivered out of order")
    if f.undelivered:
        problems.append(f"{f.undelivered} acked message(s) never reached the receiver")
    if math.isinf(f.rto_s):
        problems.append("no send succeeded after the first failure")
    if result.detected_at_s is None:
        problems.append("the cloud never showed that it noticed the fault")
    if result.rejoined_at_s is None:
        problems.append(
            f"{result.host} did not rejoin as a healthy member within {REJOIN_TIMEOUT_S:g} s"
        )
    return problems


# -- the run --------------------------------------------------------------------------


class _Drill:
    def __init__(self, cloud: Cloud, plan: Plan, state: ha_state.HaState, say: Progress) -> None:
        self.cloud = cloud
        self.plan = plan
        self.say = say
        self.host = default_host(cloud, plan.target, state) if plan.host is None else plan.host
        started = dt.datetime.now(dt.UTC)
        self.started = started.isoformat(timespec="seconds")
        self.id = f"{started:%Y%m%dT%H%M%SZ}-{plan.target}-{plan.mode}"
        self.fault: Fault | None = None
        self.detected_at: float | None = None
        self.old_leader = self.host
        self.rejoined_at: float | None = None
        self.restore_problem = ""
        self.after: ha_state.HaState | None = None

    def endpoint(self) -> Endpoint:
        options = client_options(self.cloud)
        return Endpoint((base_url(self.cloud),), options["ssl_context"], options["server_hostname"])

    async def run(self) -> DrillResult:
        plan, say = self.plan, self.say
        token = self.cloud.secrets()["imcloud_admin_token"]
        say("creating two drill users and connecting them through the public address")
        async with Load(self.endpoint(), token, self.id) as load:
            if plan.target == "app":
                # Without --host the sender's node is the one to break: move the
                # receiver off it.
                assert load.sender is not None
                sender, receiver = await load.place(self.host, self.host or load.sender.node)
                self.host = self.host or sender
                if sender != self.host or receiver == self.host:
                    raise ImcloudError(
                        f"nginx did not place the drill devices as needed (sender on "
                        f"{self.host}, receiver elsewhere; got {sender}, {receiver}); "
                        "nothing was broken"
                    )
                say(f"sender on {sender}, receiver on {receiver}")
            assert self.host is not None
            host = next(h for h in self.cloud.hosts if h.name == self.host)
            self.fault = Fault(host, plan.mode, TARGET_UNITS[plan.target], self.id)
            stop = asyncio.Event()
            say(f"load: {plan.rate:g} msg/s for {plan.duration:g} s")
            running = asyncio.create_task(load.run(plan.rate, stop))
            try:
                fault_at, restore_at = await self._break_and_restore(load)
                end = max(plan.duration, restore_at + TAIL_S)
                await asyncio.sleep(max(0.0, end - load.now()))
            finally:  # also on Ctrl-C (the task is cancelled): restore first, then stop
                if not self.fault.restored:
                    # A retry after a failed restore: the first failure still fails the drill.
                    retried = await asyncio.to_thread(self.fault.restore)
                    self.restore_problem = self.restore_problem or retried
                stop.set()
                load_end = load.now()
            await running
            say(f"waiting for {self.host} to rejoin (at most {REJOIN_TIMEOUT_S:g} s)")
            await self._wait_rejoin(load)
            say("reading the conversation's history")
            audit_error = ""
            try:
                await load.audit()
            except (ImError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                audit_error = str(exc) or type(exc).__name__
        timeline = load.timeline
        timeline.marks.update(
            {"fault": fault_at, "restore": restore_at, "end": load_end}
            | ({"detected": self.detected_at} if self.detected_at is not None else {})
            | ({"rejoined": self.rejoined_at} if self.rejoined_at is not None else {})
        )
        if plan.target == "app":
            self.detected_at = app_detection(timeline, fault_at, self.host)
            if self.detected_at is not None:
                timeline.marks["detected"] = self.detected_at
        result = DrillResult(
            id=self.id, started=self.started, domain=self.cloud.config.domain,
            profile=self.cloud.config.profile, target=plan.target, mode=plan.mode,
            host=self.host, rate=plan.rate, duration_s=round(load_end, 1),
            detection=DETECTION[plan.target], fault_at_s=fault_at,
            detected_at_s=self.detected_at, restore_at_s=restore_at,
            rejoined_at_s=self.rejoined_at,
            figures=measure(timeline, fault_at, restore_at + TAIL_S), timeline=timeline,
        )  # fmt: skip
        result.problems = judge(result, self.restore_problem, audit_error)
        if self.after is not None and self.after.problems and self.rejoined_at is None:
            result.problems += [f"after the drill: {p}" for p in self.after.problems]
        return result

    async def _break_and_restore(self, load: Load) -> tuple[float, float]:
        assert self.fault is not None
        await asyncio.sleep(LEAD_S)
        self.say(f"fault: {self.fault.describe()}")
        fault_at = load.now()
        await asyncio.to_thread(self.fault.apply)
        poller = (
            asyncio.create_task(self._poll_detection(load)) if self.plan.target != "app" else None
        )
        try:
            recovered_at = await self._hold(load, fault_at)
        finally:
            if poller is not None:
                poller.cancel()
        if recovered_at is None:
            self.say(f"not recovered within {HOLD_CAP_S:g} s; restoring")
        else:
            self.say(f"recovered {recovered_at - fault_at:.1f} s after the fault; restoring")
        restore_at = load.now()
        self.restore_problem = await asyncio.to_thread(self.fault.restore)
        return fault_at, restore_at

    def _detected(self, load: Load, fault_at: float) -> bool:
        if self.plan.target == "app":
            assert self.host is not None
            return app_detection(load.timeline, fault_at, self.host) is not None
        return self.detected_at is not None

    def _recovered(self, load: Load, fault_at: float) -> bool:
        attempts = load.timeline.attempts
        failures = [a for a in attempts if not a.ok and a.done >= fault_at]
        last = max((a.sent for a in failures), default=fault_at)
        quiet = load.now() - max((a.done for a in failures), default=fault_at) >= QUIET_S
        return quiet and any(a.ok and a.sent > last for a in attempts)

    async def _hold(self, load: Load, fault_at: float) -> float | None:
        """Until recovered (detected, sends going through again) plus a few seconds, or the cap."""
        recovered_at: float | None = None
        while load.now() < fault_at + HOLD_CAP_S:
            if recovered_at is None and self._detected(load, fault_at) and self._recovered(
                load, fault_at
            ):
                recovered_at = load.now()
            if recovered_at is not None and load.now() >= recovered_at + HOLD_AFTER_RECOVERY_S:
                break
            await asyncio.sleep(0.2)
        return recovered_at

    async def _poll_detection(self, load: Load) -> None:
        cloud, target = self.cloud, self.plan.target
        others = [h for h in cloud.hosts_in(target) if h.name != self.host]
        password = cloud.secrets()["imcloud_redis_sentinel_password"] if target == "cache" else ""
        while True:
            now = load.now()
            try:
                moved = await self._moved(cloud, target, others, password)
            except (ValueError, KeyError, TypeError, OSError, subprocess.SubprocessError) as exc:
                # One unreadable answer (a host mid-failover) must not end the polling.
                self.say(f"detection poll failed ({exc}); polling on")
                moved = False
            if moved:
                self.detected_at = now
                self.say(f"detected: {DETECTION[target]} ({now:.1f} s)")
                return
            await asyncio.sleep(POLL_S)

    async def _moved(self, cloud: Cloud, target: str, others: list[Host], password: str) -> bool:
        """Whether the part that failed over now lives on another host."""
        if target == "db":
            text = await asyncio.to_thread(ha_state.patroni_list, others)
            members = ha_state.parse_patroni_members(text) if text else []
            leaders = [m.name for m in members if m.role == "leader"]
            return bool(leaders) and leaders[0] != self.old_leader
        if target == "cache":
            ask = ha_state.sentinel_masters
            master = ha_state.majority_master(
                await asyncio.to_thread(ask, cloud, others, password)
            )
            return master is not None and master != self.old_leader
        return bool(await asyncio.to_thread(ha_state.floating_holders, cloud, others))

    async def _wait_rejoin(self, load: Load) -> None:
        deadline = time.monotonic() + REJOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            self.after = await asyncio.to_thread(ha_state.probe, self.cloud)
            if not self.after.problems:
                self.rejoined_at = load.now()
                return
            await asyncio.sleep(2)


def run_drill(
    cloud: Cloud,
    *,
    target: str,
    mode: str = "kill",
    rate: float = DEFAULT_RATE,
    duration: float = DEFAULT_DURATION,
    host: str | None = None,
    progress: Progress | None = None,
) -> DrillResult:
    """Run one drill (see the module docstring) and record it in ``<cloud>/drills/``."""
    say = progress or (lambda _: None)
    plan = check_options(cloud, target, mode, host, rate, duration)
    why = refusal(cloud, plan)
    if why:
        raise ImcloudError(why)
    say("checking that the cloud is healthy")
    state = ha_state.probe(cloud)
    if state.problems:
        raise ImcloudError(
            "the cloud is not healthy, nothing was broken: " + "; ".join(state.problems)
        )
    drill = _Drill(cloud, plan, state, say)
    try:
        result = asyncio.run(drill.run())
    finally:
        if drill.fault is not None:
            drill.fault.restore()  # no-op unless the run was interrupted mid-fault
    write_record(cloud, result.to_dict(), result.timeline)
    return result
