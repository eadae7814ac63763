"""`imcloud check`: read-only preflight of every host before anything is changed.

One SSH session per host (in parallel) runs a small read-only shell script that
prints labelled sections (os-release, meminfo, df, ss, ...). Parsing and the
decisions are pure functions over that text, so they are tested without hosts.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from installer.core.cloud import Cloud, Host

GIB = 1024**3

#: Seconds the host clock may differ from the controller's (TLS, tokens, alerts need it close).
MAX_CLOCK_SKEW_S = 5.0
#: How long the TCP connect of ssh(1) may take before the host counts as unreachable.
SSH_CONNECT_TIMEOUT_S = 5
#: Upper bound for the whole probe of one host.
PROBE_TIMEOUT_S = 60
#: MemTotal is below the nominal size (kernel, firmware): a "2 GB" VM reports ~1.9 GiB.
RAM_SLACK = 0.9
#: Directories an imcloud install leaves on every host; with one present, our own
#: services listening on their ports are a re-run, not a conflict.
INSTALL_MARKERS = ("/etc/imcloud", "/opt/imcloud")


@dataclass(frozen=True)
class Minimum:
    cores: int
    ram_gib: float
    disk_gib: float


#: The smallest host for each profile and role. A cluster host carrying several roles
#: needs the largest figure of each of them.
MINIMUMS: dict[str, dict[str, Minimum]] = {
    "single": {"*": Minimum(cores=2, ram_gib=2, disk_gib=10)},
    "cluster": {
        "lb": Minimum(cores=1, ram_gib=1, disk_gib=5),
        "app": Minimum(cores=1, ram_gib=1, disk_gib=5),
        "db": Minimum(cores=2, ram_gib=2, disk_gib=10),
        "cache": Minimum(cores=1, ram_gib=1, disk_gib=5),
        "monitoring": Minimum(cores=1, ram_gib=2, disk_gib=10),
    },
}
# ha: the same hosts as a cluster; etcd and Sentinel are small beside PostgreSQL and Redis.
MINIMUMS["ha"] = MINIMUMS["cluster"]

#: TCP ports each role listens on (docs/architecture.md, "Ports"); node exporter on every host;
#: mtail (nginx status codes for Prometheus, exporters role) on the load balancer.
ROLE_PORTS: dict[str, tuple[int, ...]] = {
    "*": (9100,),
    "lb": (80, 443, 9113, 3903),
    "app": (8080,),
    "db": (5432, 9187),
    "cache": (6379, 9121),
    "monitoring": (9090, 9093, 9115),
}
#: What profile ha adds (docs/ha.md, "Ports"): etcd client, peer, metrics and Patroni's
#: REST API on db hosts; Sentinel and its exporter on cache hosts.
HA_ROLE_PORTS: dict[str, tuple[int, ...]] = {
    "db": (2379, 2380, 2381, 8008),
    "cache": (26379, 9122),
}

#: Process names (as ss(8) shows them, truncated to 15 characters) of the services
#: imcloud runs on each port.
OWN_PROCESS_PREFIXES: dict[int, tuple[str, ...]] = {
    80: ("nginx",),
    443: ("nginx",),
    8080: ("python",),
    5432: ("postgres",),
    6379: ("redis-server",),
    3903: ("mtail",),
    **dict.fromkeys((9090, 9093, 9100, 9113, 9115, 9121, 9122, 9187), ("prometheus",)),
    **dict.fromkeys((2379, 2380, 2381), ("etcd",)),
    8008: ("patroni",),
    26379: ("redis-sentinel", "redis-server"),
}

#: Read-only probe run with `sh -s` on each host; each section starts with "@@name".
PROBE_SCRIPT = r"""
export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo @@clock; date +%s.%N
echo @@os-release; cat /etc/os-release 2>/dev/null
echo @@pid1; cat /proc/1/comm 2>/dev/null
echo @@system-state; systemctl is-system-running 2>/dev/null
echo @@python; python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null
echo @@uid; id -u
echo @@sudo; if [ "$(id -u)" != 0 ]; then sudo -n true 2>/dev/null && echo yes || echo no; fi
echo @@nproc; nproc 2>/dev/null
echo @@meminfo; cat /proc/meminfo 2>/dev/null
echo @@df; df -Pk /var 2>/dev/null
echo @@ss; if command -v ss >/dev/null; then ss -ltnpH 2>/dev/null || ss -ltnH; else echo no-ss; fi
echo @@markers; for d in MARKERS; do [ -e "$d" ] && echo "$d"; done
echo @@end
"""


@dataclass
class Finding:
    """One check on one host: what was seen and, if it failed, what the operator should do."""

    check: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class HostReport:
    host: str
    address: str
    roles: list[str]
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def failure_lines(self) -> list[str]:
        return [f"{self.host}: {f.detail} — {f.fix}" for f in self.findings if not f.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "roles": self.roles,
            "ok": self.ok,
            "facts": self.facts,
            "checks": [asdict(f) for f in self.findings],
        }


@dataclass
class CheckReport:
    hosts: list[HostReport]

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts)

    def failure_lines(self) -> list[str]:
        return [line for h in self.hosts for line in h.failure_lines()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failures": self.failure_lines(),
            "hosts": {h.host: h.to_dict() for h in self.hosts},
        }


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    processes: tuple[str, ...]


# -- parsing (pure) ---------------------------------------------------------------


def split_sections(output: str) -> dict[str, str]:
    """Split the probe's output into ``{section: text}``."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("@@"):
            current = sections.setdefault(line[2:].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in sections.items()}


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            values[key.strip()] = value.strip().strip("\"'")
    return values


def parse_meminfo_total(text: str) -> int:
    """MemTotal in bytes (0 if absent)."""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def parse_df_available(text: str) -> tuple[int, str]:
    """Available bytes and mount point from ``df -Pk`` (one filesystem)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return 0, "?"
    fields = lines[-1].split()
    if len(fields) < 6 or not fields[3].isdigit():
        return 0, "?"
    return int(fields[3]) * 1024, fields[5]


_SS_PROCESS = re.compile(r'\("([^"]+)",pid=')


def parse_listeners(text: str) -> list[Listener]:
    """Listening TCP sockets from ``ss -ltnH`` (with ``-p``, the process names too)."""
    listeners: list[Listener] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local = fields[3]
        address, sep, port = local.rpartition(":")
        if not sep or not port.isdigit():
            continue
        address = address.strip("[]").split("%", 1)[0]
        processes = tuple(dict.fromkeys(_SS_PROCESS.findall(line)))
        listeners.append(Listener(address=address, port=int(port), processes=processes))
    return listeners


# -- decisions (pure) -------------------------------------------------------------


def minimum_for(profile: str, roles: Iterable[str]) -> Minimum:
    table = MINIMUMS[profile]
    if "*" in table:
        return table["*"]
    needs = [table[r] for r in roles if r in table] or [min(table.values(), key=_size)]
    return Minimum(
        cores=max(m.cores for m in needs),
        ram_gib=max(m.ram_gib for m in needs),
        disk_gib=max(m.disk_gib for m in needs),
    )


def _size(m: Minimum) -> tuple[float, float, float]:
    return (m.cores, m.ram_gib, m.disk_gib)


def ports_for(roles: Iterable[str], profile: str = "single") -> list[int]:
    ports = set(ROLE_PORTS["*"])
    for role in roles:
        ports.update(ROLE_PORTS.get(role, ()))
        if profile == "ha":
            ports.update(HA_ROLE_PORTS.get(role, ()))
    return sorted(ports)


def is_own_listener(listener: Listener, installed: bool) -> bool:
    """Our own service from an earlier install (the port stays ours), or something else?"""
    if not installed:
        return False
    if not listener.processes:  # ss shows no process without root: trust the marker
        return True
    prefixes = OWN_PROCESS_PREFIXES.get(listener.port, ())
    return all(p.startswith(prefixes) for p in listener.processes)


def clock_skew(remote: float, sent: float, received: float) -> float:
    """How far the remote clock is outside the interval in which it was read."""
    if remote < sent:
        return sent - remote
    if remote > received:
        return remote - received
    return 0.0


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def evaluate(
    host: Host, profile: str, sections: dict[str, str], sent: float, received: float
) -> HostReport:
    """Turn one host's probe output into findings. Pure: no I/O."""
    report = HostReport(host=host.name, address=host.address, roles=list(host.roles))
    add = report.findings.append

    os_release = parse_os_release(sections.get("os-release", ""))
    pretty = os_release.get("PRETTY_NAME") or "an unknown OS (no /etc/os-release)"
    report.facts["os"] = pretty
    if os_release.get("ID") == "debian" and os_release.get("VERSION_ID") == "12":
        add(Finding("os", True, pretty))
    else:
        add(
            Finding(
                "os",
                False,
                f"runs {pretty} (ID={os_release.get('ID', '?')}, "
                f"VERSION_ID={os_release.get('VERSION_ID', '?')}), imcloud needs Debian 12",
                "reinstall the host with Debian 12 or choose another host",
            )
        )

    pid1 = sections.get("pid1", "")
    state = sections.get("system-state", "") or "unknown"
    report.facts["systemd"] = state
    if pid1 != "systemd":
        add(
            Finding(
                "systemd",
                False,
                f"PID 1 is {pid1 or 'unknown'}, not systemd",
                "boot the host with systemd (containers need a systemd init)",
            )
        )
    elif state in ("starting", "initializing"):
        add(
            Finding(
                "systemd",
                False,
                f"systemd is still booting ({state})",
                "wait until `systemctl is-system-running` says running and re-run",
            )
        )
    elif state in ("running", "degraded"):
        add(Finding("systemd", True, f"systemd {state}"))
    else:
        add(
            Finding(
                "systemd",
                False,
                f"systemd is {state}",
                "bring the host to a normal running state (`systemctl is-system-running`)",
            )
        )

    python = sections.get("python", "")
    report.facts["python"] = python or None
    if re.fullmatch(r"3\.(\d+)\.\d+", python) and int(python.split(".")[1]) >= 9:
        add(Finding("python", True, f"python3 {python}"))
    else:
        add(
            Finding(
                "python",
                False,
                f"python3 is {'missing' if not python else python + ', too old'}",
                "install it: apt-get install python3",
            )
        )

    uid = sections.get("uid", "")
    if uid == "0" or sections.get("sudo") == "yes":
        add(Finding("privileges", True, "root" if uid == "0" else "passwordless sudo"))
    else:
        add(
            Finding(
                "privileges",
                False,
                f"SSH user {host.user} is not root and has no passwordless sudo",
                "connect as root (ssh.user in imcloud.yml) or allow passwordless sudo",
            )
        )

    need = minimum_for(profile, host.roles)
    what = f"{profile} profile, roles {', '.join(host.roles)}"
    cores_text = sections.get("nproc", "")
    cores = int(cores_text) if cores_text.isdigit() else 0
    ram = parse_meminfo_total(sections.get("meminfo", ""))
    disk, mount = parse_df_available(sections.get("df", ""))
    report.facts.update(cores=cores, ram_bytes=ram, disk_free_bytes=disk, disk_mount=mount)
    if cores >= need.cores:
        add(Finding("cpu", True, f"{cores} cores"))
    else:
        add(
            Finding(
                "cpu",
                False,
                f"too small: {cores} CPU core(s), needs at least {need.cores} ({what})",
                "give the host more cores",
            )
        )
    if ram >= need.ram_gib * GIB * RAM_SLACK:
        add(Finding("ram", True, f"{_gib(ram)} RAM"))
    else:
        add(
            Finding(
                "ram",
                False,
                f"too small: {_gib(ram)} RAM, needs at least {need.ram_gib:g} GiB ({what})",
                "give the host more memory",
            )
        )
    if disk >= need.disk_gib * GIB:
        add(Finding("disk", True, f"{_gib(disk)} free on {mount}"))
    else:
        add(
            Finding(
                "disk",
                False,
                f"too small: {_gib(disk)} free on {mount} (holds /var), "
                f"needs at least {need.disk_gib:g} GiB ({what})",
                "free space or grow the disk",
            )
        )

    installed = bool(sections.get("markers"))
    wanted = ports_for(host.roles, profile)
    report.facts.update(imcloud_installed=installed, ports_needed=wanted)
    add(_ports_finding(wanted, sections.get("ss", ""), installed))

    try:
        skew = clock_skew(float(sections.get("clock", "")), sent, received)
    except ValueError:
        skew = float("inf")
    report.facts["clock_skew_s"] = round(skew, 3) if skew != float("inf") else None
    if skew <= MAX_CLOCK_SKEW_S:
        add(Finding("clock", True, f"within {MAX_CLOCK_SKEW_S:g} s of the controller"))
    else:
        add(
            Finding(
                "clock",
                False,
                f"clock is {skew:.0f} s off the controller's",
                "enable time sync (systemd-timesyncd or chrony) on the host and the controller",
            )
        )
    return report


def _ports_finding(wanted: list[int], ss_output: str, installed: bool) -> Finding:
    if ss_output == "no-ss":
        return Finding(
            "ports",
            False,
            "cannot list listening ports: ss(8) is missing",
            "install it: apt-get install iproute2",
        )
    taken: dict[int, set[str]] = {}
    for listener in parse_listeners(ss_output):
        if listener.port in wanted and not is_own_listener(listener, installed):
            taken.setdefault(listener.port, set()).update(listener.processes or {"unknown"})
    if not taken:
        return Finding("ports", True, f"free or ours: {', '.join(map(str, wanted))}")
    used = ", ".join(f"{port} ({'/'.join(sorted(names))})" for port, names in sorted(taken.items()))
    return Finding(
        "ports",
        False,
        f"port(s) already in use by other software: {used}",
        "stop or remove that software, or use a fresh host",
    )


def ssh_failure(host: Host, stderr: str) -> Finding:
    """One clear finding for an SSH connection that did not work."""
    text = stderr.strip()
    where = f"{host.address}:{host.port}"
    rules: list[tuple[str, str, str]] = [
        (
            "could not resolve hostname",
            f"cannot resolve {host.address}",
            "fix the address in imcloud.yml or the DNS record",
        ),
        (
            "connection refused",
            f"SSH refused on {where}",
            "start sshd on the host or fix the address/port in imcloud.yml",
        ),
        (
            "timed out",
            f"SSH to {where} timed out",
            "check that the host is up, the address is right and port "
            f"{host.port} is open in firewalls",
        ),
        (
            "no route to host",
            f"no route to {host.address}",
            "check the address in imcloud.yml and the network",
        ),
        (
            "network is unreachable",
            f"network to {host.address} is unreachable",
            "check the address in imcloud.yml and the controller's routes",
        ),
        (
            "host key verification failed",
            f"host key of {host.address} is unknown or has changed",
            "confirm it with `ssh-keyscan` and add it to known_hosts (or ssh.known_hosts_file)",
        ),
        (
            "permission denied",
            f"SSH key rejected for {host.user}@{host.address}",
            f"add the public key of {host.private_key_file or 'your SSH key'} to "
            f"~{host.user}/.ssh/authorized_keys on the host",
        ),
    ]
    lowered = text.lower()
    for needle, detail, fix in rules:
        if needle in lowered:
            return Finding("ssh", False, detail, fix)
    last = text.splitlines()[-1] if text else "no output"
    return Finding("ssh", False, f"SSH to {where} failed: {last}", "run `ssh` by hand to see why")


# -- I/O --------------------------------------------------------------------------


def probe_host(host: Host, profile: str) -> HostReport:
    """SSH to one host, run the read-only probe, evaluate it."""
    script = PROBE_SCRIPT.replace("MARKERS", " ".join(INSTALL_MARKERS))
    command = [
        "ssh",
        "-o",
        f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
        *host.ssh_args(),
        "--",
        "sh",
        "-s",
    ]
    sent = time.time()
    try:
        proc = subprocess.run(
            command, input=script, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        report = HostReport(host=host.name, address=host.address, roles=list(host.roles))
        report.findings.append(
            Finding(
                "ssh",
                False,
                f"no answer from {host.address} within {PROBE_TIMEOUT_S} s",
                "check that the host is up and not overloaded",
            )
        )
        return report
    received = time.time()
    sections = split_sections(proc.stdout)
    if proc.returncode == 255 or "end" not in sections:
        report = HostReport(host=host.name, address=host.address, roles=list(host.roles))
        report.findings.append(ssh_failure(host, proc.stderr))
        return report
    report = evaluate(host, profile, sections, sent, received)
    report.findings.insert(0, Finding("ssh", True, f"{host.user}@{host.address}:{host.port}"))
    return report


def check_cloud(cloud: Cloud) -> CheckReport:
    """Probe every host of the cloud in parallel. Changes nothing on any host."""
    hosts = cloud.hosts
    profile = cloud.config.profile
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        reports = list(pool.map(lambda h: probe_host(h, profile), hosts))
    return CheckReport(hosts=reports)
