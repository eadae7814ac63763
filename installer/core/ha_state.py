"""What the cloud's redundant parts say about themselves, asked over SSH (docs/ha.md).

One SSH session per host runs a short script (sent on stdin, so no secret is on a
command line) whose output has one ``@@section`` per question:

- every host: ``systemctl is-active`` of the units of its roles that fail over
  (:data:`UNITS`);
- app: the IM server's ``/readyz`` on the host's internal address;
- ha, lb: ``ip -br addr`` (who holds the floating address);
- ha, cache: its Sentinel's master (``SENTINEL get-master-addr-by-name imcloud``);
- ha, db: ``patronictl list -f json`` (asked on the first db host, every db host
  answers for the whole cluster).

Parsing and judging (:func:`evaluate`) are pure; :func:`probe` does the I/O.
On ``single`` and ``cluster`` clouds the Patroni, Sentinel and floating-address
parts are absent (None).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from installer.core.cloud import Cloud, Host
from installer.core.preflight import split_sections

__all__ = [
    "HaState",
    "PatroniMember",
    "UNITS",
    "evaluate",
    "floating_holders",
    "majority_master",
    "parse_ip_addresses",
    "parse_patroni_members",
    "parse_sentinel_master",
    "patroni_list",
    "probe",
    "run_script",
    "sentinel_masters",
]

IM_SERVER_PORT = 8080
SENTINEL_PORT = 26379
SENTINEL_MASTER = "imcloud"
PATRONI_CONFIG = "/etc/patroni/config.yml"
CA_FILE = "/etc/imcloud/tls/ca.crt"
SSH_TIMEOUT_S = 20

#: Units per role whose state the probe reports (HA_UNITS too on profile ha).
UNITS: dict[str, tuple[str, ...]] = {
    "app": ("imcloud-im-server.service",),
    "lb": ("nginx.service",),
}
HA_UNITS: dict[str, tuple[str, ...]] = {
    "db": ("patroni.service",),
    "cache": ("redis-server.service", "redis-sentinel.service"),
    "lb": ("keepalived.service",),
}

REPLICA_STATES = ("running", "streaming")

_SCRIPT_HEAD = "export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"


@dataclass(frozen=True)
class PatroniMember:
    name: str
    host: str
    role: str  # leader | sync_standby | replica | standby_leader | ...
    state: str  # running | streaming | stopped | ...
    timeline: int | None
    lag_mb: float | None


@dataclass
class HaState:
    """One look at the cloud. ``problems`` empty means healthy (the shape docs/ha.md asks for)."""

    units: dict[str, dict[str, str]]  # host -> unit -> is-active answer
    app_ready: dict[str, str]  # app host -> "" when ready, else why not
    patroni: list[PatroniMember] | None = None  # None: not ha, or no db host answered
    # cache host -> the master its Sentinel names (a host name; None: no answer)
    sentinels: dict[str, str | None] | None = None
    floating_holders: list[str] | None = None  # lb hosts holding the floating address
    problems: list[str] = field(default_factory=list)

    @property
    def patroni_leader(self) -> str | None:
        leaders = [m.name for m in self.patroni or () if m.role == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    @property
    def redis_master(self) -> str | None:
        """The master a majority of the Sentinels name, if any."""
        return majority_master(self.sentinels or {})

    @property
    def floating_holder(self) -> str | None:
        holders = self.floating_holders or []
        return holders[0] if len(holders) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            patroni_leader=self.patroni_leader,
            redis_master=self.redis_master,
            floating_holder=self.floating_holder,
        )
        return data


# -- parsing (pure) -------------------------------------------------------------------


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _strip_port(host: str) -> str:
    """``10.0.0.1:5432`` -> ``10.0.0.1``; ``[fd00::1]:5432`` -> ``fd00::1``; bare addresses stay."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def parse_patroni_members(text: str) -> list[PatroniMember]:
    """``patronictl list -f json``: one object per member; roles normalised to snake_case."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("patronictl list: expected a JSON list")
    members = []
    for item in data:
        timeline = _number(item.get("TL"))
        members.append(
            PatroniMember(
                name=str(item["Member"]),
                host=_strip_port(str(item.get("Host", ""))),
                role=str(item.get("Role", "")).strip().lower().replace(" ", "_"),
                state=str(item.get("State", "")).strip().lower(),
                timeline=None if timeline is None else int(timeline),
                lag_mb=_number(item.get("Lag in MB")),
            )
        )
    return members


def parse_sentinel_master(text: str) -> str | None:
    """``redis-cli SENTINEL get-master-addr-by-name``: ``addr\\nport``; None for anything else."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 2 or not lines[1].isdigit():
        return None
    return lines[0]


def parse_ip_addresses(text: str) -> set[str]:
    """Every address in ``ip -br addr`` output (without prefix lengths)."""
    found = set()
    for line in text.splitlines():
        for field_ in line.split()[2:]:
            found.add(field_.split("/", 1)[0])
    return found


def majority_master(masters: dict[str, str | None]) -> str | None:
    named = Counter(m for m in masters.values() if m is not None)
    if not named:
        return None
    master, votes = named.most_common(1)[0]
    return master if votes > len(masters) // 2 else None


# -- judging (pure) -------------------------------------------------------------------


def expected_units(host: Host, ha: bool) -> list[str]:
    units: list[str] = []
    for table in (UNITS, HA_UNITS) if ha else (UNITS,):
        for role in host.roles:
            units += [u for u in table.get(role, ()) if u not in units]
    return units


def evaluate(
    cloud: Cloud,
    sections: dict[str, dict[str, str] | str],
    patroni_text: str | None = None,
) -> HaState:
    """Judge the probe's output. ``sections`` maps host name to its parsed sections, or to
    a string saying why the host did not answer. ``patroni_text`` is the output of
    ``patronictl list -f json`` (None: no db host gave it)."""
    ha = cloud.config.profile == "ha"
    problems: list[str] = []
    units: dict[str, dict[str, str]] = {}
    app_ready: dict[str, str] = {}
    by_address = {h.internal_address: h.name for h in cloud.hosts}
    by_address.update({h.address: h.name for h in cloud.hosts})
    sentinels: dict[str, str | None] = {}
    holders: list[str] = []
    for host in cloud.hosts:
        got = sections.get(host.name, "no answer")
        if isinstance(got, str):
            problems.append(f"{host.name}: {got}")
            units[host.name] = {}
            if "app" in host.roles:
                app_ready[host.name] = got
            if ha and "cache" in host.roles:
                sentinels[host.name] = None
            continue
        states = dict(zip(expected_units(host, ha), got.get("units", "").split(), strict=False))
        units[host.name] = states
        for unit in expected_units(host, ha):
            answer = states.get(unit, "unknown")
            if answer != "active":
                problems.append(f"{host.name}: {unit} is {answer}")
        if "app" in host.roles:
            answer = got.get("readyz", "").strip()
            app_ready[host.name] = "" if answer.startswith("200") else (
                f"IM server not ready ({answer or 'no answer'})"
            )
            if app_ready[host.name]:
                problems.append(f"{host.name}: {app_ready[host.name]}")
        if ha and "cache" in host.roles:
            address = parse_sentinel_master(got.get("sentinel", ""))
            sentinels[host.name] = None if address is None else by_address.get(address, address)
            if address is None:
                said = got.get("sentinel", "").strip().splitlines()
                why = said[-1] if said else "no answer"
                problems.append(f"{host.name}: Sentinel names no master ({why})")
        if ha and "lb" in host.roles:
            if cloud.config.ha.floating_address in parse_ip_addresses(got.get("addresses", "")):
                holders.append(host.name)
    state = HaState(units=units, app_ready=app_ready)
    if ha:
        state.sentinels = sentinels
        state.floating_holders = holders
        problems += _sentinel_problems(sentinels, {h.name for h in cloud.hosts_in("cache")})
        problems += _floating_problems(cloud.config.ha.floating_address or "", holders)
        if patroni_text is None:
            problems.append("Patroni: no db host answered `patronictl list`")
        else:
            try:
                state.patroni = parse_patroni_members(patroni_text)
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"Patroni: unreadable `patronictl list` output ({exc})")
            else:
                problems += patroni_problems(state.patroni, [h.name for h in cloud.hosts_in("db")])
    state.problems = problems
    return state


def patroni_problems(members: list[PatroniMember], db_hosts: Iterable[str]) -> list[str]:
    """One leader (running), every other member streaming, one synchronous standby."""
    problems = []
    names = {m.name for m in members}
    for host in db_hosts:
        if host not in names:
            problems.append(f"Patroni: {host} is not a member")
    leaders = [m for m in members if m.role == "leader"]
    if len(leaders) != 1:
        problems.append(
            f"Patroni: {len(leaders)} leaders ({', '.join(m.name for m in leaders) or 'none'})"
        )
    for member in members:
        if member.role == "leader":
            if member.state != "running":
                problems.append(f"Patroni: {member.name} (leader) is {member.state}, not running")
        # Patroni 3.0 (Debian 12) says "running" for a replica where later releases say
        # "streaming"; there, only a lag it can compute ("Lag in MB" not "unknown")
        # shows that the replica replays from the leader.
        elif member.state == "running" and member.lag_mb is None:
            problems.append(
                f"Patroni: {member.name} ({member.role}) is running with unknown lag, "
                "not streaming"
            )
        elif member.state not in REPLICA_STATES:
            problems.append(
                f"Patroni: {member.name} ({member.role}) is {member.state}, not streaming"
            )
    if leaders and not any(m.role == "sync_standby" for m in members):
        problems.append("Patroni: no synchronous standby")
    return problems


def _sentinel_problems(sentinels: dict[str, str | None], cache_hosts: set[str]) -> list[str]:
    named = {m for m in sentinels.values() if m is not None}
    if len(named) > 1:
        views = ", ".join(f"{host} names {master}" for host, master in sorted(sentinels.items()))
        return [f"Sentinels disagree on the Redis master: {views}"]
    if named and not named <= cache_hosts:
        return [f"Sentinels name {named.pop()} as Redis master, not a cache host"]
    return []


def _floating_problems(address: str, holders: list[str]) -> list[str]:
    if not holders:
        return [f"floating address {address} is on no lb host"]
    if len(holders) > 1:
        return [f"floating address {address} is on several lb hosts: {', '.join(holders)}"]
    return []


# -- I/O ------------------------------------------------------------------------------


def run_script(host: Host, script: str, timeout: float = SSH_TIMEOUT_S) -> tuple[int, str, str]:
    """Run a POSIX shell script as root on the host (through ``sudo -n`` for another SSH
    user); the script goes on stdin. ``$IMCLOUD_SSH_CLIENT`` in it is the controller's
    address and port as the host sees them. Returns (exit code, stdout, stderr); 255 is
    SSH's own failure."""
    sudo = "" if host.user == "root" else "sudo -n "
    remote = f'{sudo}env "IMCLOUD_SSH_CLIENT=$SSH_CLIENT" sh -s'
    command = ["ssh", *host.ssh_args(), "--", remote]
    try:
        proc = subprocess.run(
            command, input=_SCRIPT_HEAD + script, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return 255, "", f"no answer within {timeout:g} s"
    return proc.returncode, proc.stdout, proc.stderr


def _ssh_failure(stderr: str) -> str:
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    return f"no answer over SSH ({last})"


def host_script(cloud: Cloud, host: Host, sentinel_password: str | None) -> str:
    """The probe script for one host (see the module docstring)."""
    ha = cloud.config.profile == "ha"
    units = " ".join(expected_units(host, ha))
    lines = [f"echo @@units; systemctl is-active {units} 2>/dev/null; true"]
    if "app" in host.roles:
        url = f"http://{_url_host(host.internal_address)}:{IM_SERVER_PORT}/readyz"
        lines.append(
            "echo @@readyz; python3 - <<'EOF'\n"
            "import urllib.error, urllib.request\n"
            "try:\n"
            f"    with urllib.request.urlopen({url!r}, timeout=3) as r:\n"
            "        print(r.status, r.read().decode(errors='replace')[:200])\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code, e.read().decode(errors='replace')[:200])\n"
            "except OSError as e:\n"
            "    print('error', e)\n"
            "EOF"
        )
    if ha and "lb" in host.roles:
        lines.append("echo @@addresses; ip -br addr")
    if ha and "cache" in host.roles and sentinel_password is not None:
        lines.append(sentinel_command(host, sentinel_password, "@@sentinel"))
    lines.append("echo @@end")
    return "\n".join(lines) + "\n"


def sentinel_command(host: Host, password: str, marker: str) -> str:
    """Ask the host's Sentinel for the master; the password is in the script (stdin), given to
    redis-cli through REDISCLI_AUTH, never on a command line."""
    return (
        f"echo {marker}; REDISCLI_AUTH={shlex.quote(password)} "
        f"redis-cli --tls --cacert {CA_FILE} -h {host.internal_address} -p {SENTINEL_PORT} "
        f"SENTINEL get-master-addr-by-name {SENTINEL_MASTER} 2>&1"
    )


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def patroni_list(hosts: Iterable[Host]) -> str | None:
    """``patronictl list -f json`` from the first of ``hosts`` that answers it."""
    for host in hosts:
        code, out, _ = run_script(host, f"patronictl -c {PATRONI_CONFIG} list -f json\n")
        if code == 0 and out.strip().startswith("["):
            return out
    return None


def probe(cloud: Cloud) -> HaState:
    """Ask every host (in parallel) and judge the answers."""
    ha = cloud.config.profile == "ha"
    password = cloud.secrets()["imcloud_redis_sentinel_password"] if ha else None

    def ask(host: Host) -> dict[str, str] | str:
        code, out, err = run_script(host, host_script(cloud, host, password))
        sections = split_sections(out)
        if code == 255 or "end" not in sections:
            return _ssh_failure(err)
        return sections

    hosts = cloud.hosts
    with ThreadPoolExecutor(max_workers=min(16, len(hosts) + 1)) as pool:
        patroni = pool.submit(patroni_list, cloud.hosts_in("db")) if ha else None
        answers = dict(zip([h.name for h in hosts], pool.map(ask, hosts), strict=True))
        patroni_text = patroni.result() if patroni is not None else None
    return evaluate(cloud, dict(answers), patroni_text)


def sentinel_masters(cloud: Cloud, hosts: list[Host], password: str) -> dict[str, str | None]:
    """The master (a host name) each of these cache hosts' Sentinel names; None: no answer."""
    by_address = {h.internal_address: h.name for h in cloud.hosts}

    def ask(host: Host) -> str | None:
        _, out, _ = run_script(host, sentinel_command(host, password, "@@sentinel") + "\n")
        address = parse_sentinel_master(split_sections(out).get("sentinel", ""))
        return None if address is None else by_address.get(address, address)

    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        return dict(zip([h.name for h in hosts], pool.map(ask, hosts), strict=True))


def floating_holders(cloud: Cloud, hosts: list[Host]) -> list[str]:
    """Which of these lb hosts hold the floating address now."""
    address = cloud.config.ha.floating_address

    def holds(host: Host) -> bool:
        code, out, _ = run_script(host, "ip -br addr\n")
        return code == 0 and address in parse_ip_addresses(out)

    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        return [h.name for h, held in zip(hosts, pool.map(holds, hosts), strict=True) if held]
