"""Local lab hosts: Debian 12 system containers (systemd-nspawn) on a private bridge.

Python API (what `imcloud lab`, `quickstart` and the end-to-end tests call)::

    from installer.core.lab import Lab, LabHost
    lab = Lab("demo")                  # ImcloudError if the name is not [a-z][a-z0-9-]{0,23}
    hosts = lab.up(3)                  # -> list[LabHost]; reuses a running lab of that size
    hosts = lab.up(3, progress=cb)     # cb(node_name, phase) is called as each host advances
    lab.hosts()                        # -> list[LabHost] of a lab that is up (ImcloudError if not)
    lab.status()                       # -> LabStatus (exists, subnet, nodes with running/state)
    lab.ssh_command("node1", "uname", "-r")   # -> argv for ssh(1) as root with the lab key
    lab.controller_address()           # this machine as the hosts see it (their gateway)
    lab.down()                         # removes everything; safe twice or after a crash
    lab.inventory_path, lab.state_path, lab.key_path, lab.known_hosts_path
    list_labs()                        # names of the labs present on this machine
    # LabHost(name, address, user, private_key_file, known_hosts_file); host.ssh_args()

Layout of one lab (every name is derived from the lab name, so `down` works without state):

- nodes ``node1``..``nodeN`` at ``10.213.<n>.11``.. on bridge ``imlb-<hash>`` whose
  address ``10.213.<n>.1`` is the gateway; ``<n>`` is picked per lab name
  (first free index from a hash of the name) so labs coexist;
- netns ``imlab-<lab>-<node>`` with ``eth0`` (veth ``imlv<hash>-<i>`` on the bridge);
- overlay of the shared base tree under ``/var/lib/imcloud-lab/labs/<lab>/nodes/<node>``;
- ``state.json``, ``inventory.yml``, ``id_ed25519`` (lab key), ``known_hosts`` (each host's
  freshly generated host keys, so SSH checks them strictly) in ``/var/lib/imcloud-lab/labs/<lab>``.

Lab hosts have NO default route: only the lab subnet and a host route to the
package cache (see lab_base). The controller also drops anything routed in or
out of the lab bridge (nftables table ``imcloud_lab_<hash>``). Roles must
therefore use ``ansible_host``/``imcloud_internal_address``, not
``ansible_default_ipv4`` (it is empty on lab hosts).

Containers run with a private network (their netns) and CAP_NET_ADMIN, so
nft and net.* sysctls work inside. They inherit the controller's open-files
hard limit (this VM lacks CAP_SYS_RESOURCE, so units cannot ask for more).

`down` stops each container with SIGTERM to systemd-nspawn (an orderly
poweroff of the host's systemd), SIGKILL after a grace period, then removes
mounts, namespaces, links, firewall table and files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from installer.core import lab_base as base
from installer.core import lab_system as sysx
from installer.errors import ImcloudError

LABS_ROOT = base.STATE_ROOT / "labs"
GLOBAL_LOCK = base.RUN_ROOT / "labs.lock"
SUBNET_PREFIX = "10.213"
MAX_NODES = 32
FIRST_HOST_OCTET = 11
USER = "root"
BOOT_TIMEOUT = 180.0
STOP_GRACE = 15.0
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
REQUIRED_TOOLS = ("systemd-nspawn", "debootstrap", "ip", "nft", "mount", "umount", "ssh",
                  "ssh-keygen", "chroot")
READY_STATES = ("running", "degraded")

Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class LabHost:
    """How to reach one lab host over SSH."""

    name: str
    address: str
    user: str
    private_key_file: Path
    known_hosts_file: Path

    def ssh_options(self) -> list[str]:
        return [
            "-i", str(self.private_key_file), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_file}",
            "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
        ]

    def ssh_args(self) -> list[str]:
        return [*self.ssh_options(), f"{self.user}@{self.address}"]


@dataclass(frozen=True)
class NodeStatus:
    name: str
    address: str
    running: bool  # its systemd-nspawn process is alive
    state: str  # `systemctl is-system-running` over SSH, or "stopped"/"unreachable"


@dataclass(frozen=True)
class LabStatus:
    name: str
    exists: bool
    subnet: str | None = None
    inventory: str | None = None
    nodes: list[NodeStatus] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- pure parts (unit tested) -------------------------------------------------

def _host_gone(netns: str) -> bool:
    """No systemd-nspawn for the host and no process left in its network namespace."""
    return not sysx.nspawn_pids(netns) and not sysx.netns_pids(netns)


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ImcloudError(
            f"invalid lab name {name!r}: use 1-24 characters a-z, 0-9 and '-', "
            "starting with a letter"
        )
    return name


def validate_nodes(nodes: int) -> int:
    if not 1 <= nodes <= MAX_NODES:
        raise ImcloudError(f"--nodes must be between 1 and {MAX_NODES}, got {nodes}")
    return nodes


def name_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def node_names(nodes: int) -> list[str]:
    return [f"node{i}" for i in range(1, nodes + 1)]


def allocate_subnet(name: str, taken: set[int]) -> ipaddress.IPv4Network:
    """10.213.<n>.0/24 for a lab: the first free n from a hash of the name (n=0 is the cache)."""
    start = int(name_hash(name), 16) % 254
    for step in range(254):
        index = (start + step) % 254 + 1
        if index not in taken:
            return ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{index}.0/24")
    raise ImcloudError("no free lab subnet left in 10.213.0.0/16: remove a lab first")


def subnet_index(subnet: ipaddress.IPv4Network) -> int:
    return int(str(subnet.network_address).split(".")[2])


def host_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    """Address of node<index> (1-based)."""
    return str(subnet.network_address + FIRST_HOST_OCTET - 1 + index)


def gateway_address(subnet: ipaddress.IPv4Network) -> str:
    return str(subnet.network_address + 1)


def render_inventory(hosts: list[LabHost], lab: str) -> str:
    """Ansible YAML inventory for the lab's hosts."""
    if not hosts:
        raise ImcloudError("a lab inventory needs at least one host")
    first = hosts[0]
    common_args = " ".join([
        f"-o UserKnownHostsFile={first.known_hosts_file}", "-o StrictHostKeyChecking=yes",
        "-o IdentitiesOnly=yes",
    ])
    doc = {
        "all": {
            "children": {
                f"lab_{lab.replace('-', '_')}": {
                    "hosts": {h.name: {"ansible_host": h.address} for h in hosts},
                },
            },
            "vars": {
                "ansible_user": first.user,
                "ansible_ssh_private_key_file": str(first.private_key_file),
                "ansible_ssh_common_args": common_args,
                "ansible_python_interpreter": "/usr/bin/python3",
            },
        }
    }
    return f"# imcloud lab {lab}: generated by `imcloud lab up`, removed by `lab down`\n" + \
        yaml.safe_dump(doc, sort_keys=False)


def render_etc_hosts(node: str, peers: list[tuple[str, str]]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             "ff02::1\tip6-allnodes", "ff02::2\tip6-allrouters"]
    lines += [f"{address}\t{name}" for name, address in peers]
    return f"# imcloud lab host {node}\n" + "\n".join(lines) + "\n"


def render_known_hosts(entries: list[tuple[str, str, list[str]]]) -> str:
    """Lines `name,address keytype key` for each (name, address, public key lines)."""
    out = []
    for name, address, keys in entries:
        for key in keys:
            keytype, blob = key.split()[:2]
            out.append(f"{name},{address} {keytype} {blob}")
    return "\n".join(out) + "\n"


def preflight() -> None:
    """Refuse, before changing anything, to run where a lab cannot boot."""
    if not sys.platform.startswith("linux"):
        raise ImcloudError("imcloud lab needs Linux (systemd-nspawn, network namespaces)")
    if os.geteuid() != 0:
        raise ImcloudError("imcloud lab needs root (mounts, network namespaces, systemd-nspawn)")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if not base.ACNG_BIN.exists():
        missing.append("apt-cacher-ng")
    if missing:
        raise ImcloudError(
            f"imcloud lab needs {', '.join(missing)}: run `bash scripts/setup.sh` "
            "(Debian packages debootstrap, systemd-container, apt-cacher-ng, iproute2, nftables)"
        )


def list_labs() -> list[str]:
    if not LABS_ROOT.is_dir():
        return []
    return sorted(p.name for p in LABS_ROOT.iterdir() if (p / "state.json").is_file())


# -- the lab ------------------------------------------------------------------

class Lab:
    """One named lab on this machine."""

    def __init__(self, name: str = "default") -> None:
        self.name = validate_name(name)
        self.dir = LABS_ROOT / name
        self.hash = name_hash(name)
        self.bridge = f"imlb-{self.hash}"
        self.nft_table = f"imcloud_lab_{self.hash}"

    # paths
    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def inventory_path(self) -> Path:
        return self.dir / "inventory.yml"

    @property
    def key_path(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts_path(self) -> Path:
        return self.dir / "known_hosts"

    def _lock(self) -> Any:
        return sysx.file_lock(base.RUN_ROOT / f"lab-{self.name}.lock")

    def netns(self, node: str) -> str:
        return f"imlab-{self.name}-{node}"

    def veth(self, index: int) -> str:
        return f"imlv{self.hash}-{index}"

    def cgroup_name(self, node: str) -> str:
        return f"{self.name}-{node}"

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    # state
    def _read_state(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ImcloudError(f"unreadable lab state {self.state_path}: {exc}") from exc
        return data

    def _write_state(self, state: dict[str, Any]) -> None:
        sysx.write_atomic(self.state_path, json.dumps(state, indent=2) + "\n")

    def _host(self, node: dict[str, Any]) -> LabHost:
        return LabHost(node["name"], node["address"], USER, self.key_path, self.known_hosts_path)

    def hosts(self) -> list[LabHost]:
        state = self._read_state()
        if state is None or state.get("phase") != "up":
            raise ImcloudError(
                f"lab {self.name} is not up: run `imcloud lab up --name {self.name}`"
            )
        return [self._host(n) for n in state["nodes"]]

    def host(self, node: str) -> LabHost:
        for h in self.hosts():
            if h.name == node:
                return h
        names = ", ".join(h.name for h in self.hosts())
        raise ImcloudError(f"lab {self.name} has no node {node!r} (nodes: {names})")

    def controller_address(self) -> str:
        """This machine's address as the lab's hosts see it (their gateway on the lab bridge)."""
        self.hosts()  # the lab must be up
        state = self._read_state() or {}
        return str(state["gateway"])

    def ssh_command(self, node: str, *command: str) -> list[str]:
        return ["ssh", *self.host(node).ssh_args(), *command]

    # up --------------------------------------------------------------------
    def up(self, nodes: int = 1, progress: Progress | None = None) -> list[LabHost]:
        """Boot `nodes` hosts (or reuse a running lab of that size) and return them."""
        validate_nodes(nodes)
        preflight()
        report = progress or (lambda _node, _phase: None)
        with self._lock():
            state = self._read_state()
            if state is not None and state.get("phase") == "up":
                if len(state["nodes"]) != nodes:
                    raise ImcloudError(
                        f"lab {self.name} is up with {len(state['nodes'])} nodes, not {nodes}: "
                        f"run `imcloud lab down --name {self.name}` first"
                    )
                if self._all_ready(state):
                    for n in state["nodes"]:
                        report(n["name"], "ready (reused)")
                    return [self._host(n) for n in state["nodes"]]
            # Whatever a crash or a half-stopped lab left behind goes first.
            self._teardown(report, release_cache=False)
            try:
                return self._boot(nodes, report)
            except BaseException:
                self._teardown(report)
                raise

    def _all_ready(self, state: dict[str, Any]) -> bool:
        return all(self._node_running(n["name"]) and
                   self._system_state(self._host(n)) in READY_STATES for n in state["nodes"])

    def _boot(self, nodes: int, report: Progress) -> list[LabHost]:
        names = node_names(nodes)
        self.dir.mkdir(parents=True, exist_ok=True)
        with sysx.file_lock(GLOBAL_LOCK):
            subnet = allocate_subnet(self.name, self._taken_subnets())
            state: dict[str, Any] = {
                "name": self.name, "phase": "starting", "subnet": str(subnet),
                "gateway": gateway_address(subnet), "bridge": self.bridge,
                "cache_proxy": base.cache_proxy_url(), "key": str(self.key_path),
                "known_hosts": str(self.known_hosts_path), "inventory": str(self.inventory_path),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "nodes": [{"name": n, "address": host_address(subnet, i),
                           "netns": self.netns(n), "veth": self.veth(i)}
                          for i, n in enumerate(names, start=1)],
            }
            self._write_state(state)
            base.ensure_cache()
        for n in names:
            report(n, "preparing base")
        base_tree, _ = base.ensure_base()
        state["base"] = str(base_tree)
        self._write_state(state)
        if not self.key_path.exists():
            sysx.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                      f"imcloud-lab-{self.name}", "-f", str(self.key_path)])
        gateway = gateway_address(subnet)
        sysx.create_bridge(self.bridge, f"{gateway}/{subnet.prefixlen}")
        sysx.install_forward_guard(self.nft_table, self.bridge)
        peers = [(n["name"], n["address"]) for n in state["nodes"]]
        known: list[tuple[str, str, list[str]]] = []
        for node in state["nodes"]:
            report(node["name"], "starting")
            known.append((node["name"], node["address"],
                          self._prepare_node(node, base_tree, peers, subnet)))
            self._start_node(node)
        sysx.write_atomic(self.known_hosts_path, render_known_hosts(known))
        hosts = [self._host(n) for n in state["nodes"]]
        give_up = threading.Event()  # one host failing stops the others' waits
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            futures = [pool.submit(self._wait_ready, h, report, give_up) for h in hosts]
            try:
                for fut in futures:
                    fut.result()
            finally:
                give_up.set()
        sysx.write_atomic(self.inventory_path, render_inventory(hosts, self.name))
        state["phase"] = "up"
        self._write_state(state)
        return hosts

    def _taken_subnets(self) -> set[int]:
        taken: set[int] = set()
        for other in list_labs():
            if other == self.name:
                continue
            data = Lab(other)._read_state()
            if data and "subnet" in data:
                taken.add(subnet_index(ipaddress.IPv4Network(data["subnet"])))
        # Also avoid anything else on this machine already using 10.213.x.0/24.
        out = sysx.run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
        for match in re.finditer(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.\d+/(\d+)", out):
            if int(match.group(2)) <= 24:
                taken.add(int(match.group(1)))
        return taken

    def _prepare_node(self, node: dict[str, Any], base_tree: Path,
                      peers: list[tuple[str, str]], subnet: ipaddress.IPv4Network) -> list[str]:
        """Overlay, identity, key and network of one host; returns its public host keys."""
        name = node["name"]
        ndir = self.node_dir(name)
        merged = ndir / "merged"
        sysx.mount_overlay(base_tree, ndir / "upper", ndir / "work", merged)
        (merged / "etc/hostname").write_text(f"{name}\n")
        (merged / "etc/hosts").write_text(render_etc_hosts(name, peers))
        (merged / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        ssh_dir = merged / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        pub = self.key_path.with_suffix(".pub").read_text()
        sysx.write_atomic(ssh_dir / "authorized_keys", pub, mode=0o600)
        for old in (merged / "etc/ssh").glob("ssh_host_*"):
            old.unlink()
        sysx.run(["ssh-keygen", "-A", "-f", str(merged)])
        keys = [p.read_text().strip() for p in sorted((merged / "etc/ssh").glob("ssh_host_*.pub"))]
        gateway = gateway_address(subnet)
        sysx.create_host_netns(node["netns"], node["veth"], self.bridge,
                               f"{node['address']}/{subnet.prefixlen}",
                               routes=[(f"{base.CACHE_ADDRESS}/32", gateway)])
        return keys

    def _start_node(self, node: dict[str, Any]) -> None:
        ndir = self.node_dir(node["name"])
        cmd = [
            "systemd-nspawn", "-D", str(ndir / "merged"), "--boot", "--register=no",
            "--keep-unit", f"--network-namespace-path={sysx.NETNS_DIR / node['netns']}",
            "-M", node["name"], "--link-journal=no", "--resolv-conf=off", "--timezone=off",
            "--console=read-only", "--private-network", "--capability=CAP_NET_ADMIN",
        ]
        cgroups = sysx.host_cgroups(self.cgroup_name(node["name"]))
        sysx.remove_cgroups(cgroups)  # a crashed run's tree would confuse the new systemd
        sysx.create_cgroups(cgroups)
        with open(ndir / "console.log", "ab") as log:
            proc = subprocess.Popen(sysx.in_cgroups(cgroups, cmd), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sysx.wait_for_exec(proc, "systemd-nspawn")

    def _node_running(self, node: str) -> bool:
        return bool(sysx.nspawn_pids(self.netns(node)))

    def _console_tail(self, node: str) -> str:
        try:
            lines = (self.node_dir(node) / "console.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-3:] if line.strip())

    def _system_state(self, host: LabHost) -> str:
        try:
            proc = subprocess.run(["ssh", *host.ssh_args(), "systemctl", "is-system-running"],
                                  capture_output=True, text=True, timeout=15,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return "unreachable"
        if proc.returncode == 255:
            return "unreachable"
        return proc.stdout.strip() or "unknown"

    def _wait_ready(self, host: LabHost, report: Progress, give_up: threading.Event) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        report(host.name, "booting")
        phase = "booting"
        state = "unreachable"
        while time.monotonic() < deadline and not give_up.is_set():
            if not self._node_running(host.name):
                raise ImcloudError(f"lab host {host.name} stopped while booting: "
                                   f"{self._console_tail(host.name)}")
            if phase == "booting":
                with socket.socket() as s:
                    s.settimeout(1)
                    if s.connect_ex((host.address, 22)) == 0:
                        phase = "sshd up"
                        report(host.name, "waiting for systemd")
            if phase != "booting":
                state = self._system_state(host)
                if state in READY_STATES:
                    report(host.name, f"ready ({state})")
                    return
            time.sleep(0.5)
        if give_up.is_set():
            return
        raise ImcloudError(f"lab host {host.name} not ready after {BOOT_TIMEOUT:.0f} s "
                           f"(system state: {state}): {self._console_tail(host.name)}")

    # status / down ---------------------------------------------------------
    def status(self) -> LabStatus:
        state = self._read_state()
        if state is None:
            return LabStatus(self.name, exists=False)
        nodes = []
        for n in state["nodes"]:
            running = self._node_running(n["name"])
            system = self._system_state(self._host(n)) if running else "stopped"
            nodes.append(NodeStatus(n["name"], n["address"], running, system))
        inventory = str(self.inventory_path) if self.inventory_path.exists() else None
        return LabStatus(self.name, True, state.get("subnet"), inventory, nodes)

    def down(self, progress: Progress | None = None) -> None:
        """Remove the lab entirely; does nothing harmful if it is already gone."""
        preflight()
        report = progress or (lambda _node, _phase: None)
        with self._lock():
            self._teardown(report)

    def _node_names_present(self) -> list[str]:
        found: set[str] = set()
        state = self._read_state() if self.state_path.exists() else None
        if state:
            found.update(n["name"] for n in state["nodes"])
        prefix = f"imlab-{self.name}-"
        found.update(ns[len(prefix):] for ns in sysx.list_netns(prefix)
                     if re.fullmatch(r"node\d+", ns[len(prefix):]))
        if (self.dir / "nodes").is_dir():
            found.update(p.name for p in (self.dir / "nodes").iterdir())
        return sorted(found, key=lambda n: (len(n), n))

    def _teardown(self, report: Progress, release_cache: bool = True) -> None:
        nodes = self._node_names_present()
        for node in nodes:
            report(node, "stopping")
            nspawn = sysx.nspawn_pids(self.netns(node))
            if nspawn:  # orderly: systemd-nspawn powers the host's systemd off
                sysx.signal_pids(nspawn, signal.SIGTERM)
            else:  # its systemd-nspawn died (crash): nobody to power it off cleanly
                sysx.signal_pids(sysx.netns_pids(self.netns(node)), signal.SIGKILL)
        for node in nodes:
            netns = self.netns(node)
            if not sysx.wait_until(partial(_host_gone, netns), STOP_GRACE):
                sysx.signal_pids(sysx.nspawn_pids(netns), signal.SIGKILL)
                sysx.signal_pids(sysx.netns_pids(netns), signal.SIGKILL)
                sysx.wait_until(partial(_host_gone, netns), 5)
        for node in nodes:
            sysx.remove_cgroups(sysx.host_cgroups(self.cgroup_name(node)))
            sysx.unmount(self.node_dir(node) / "merged")
            sysx.delete_netns(self.netns(node))
            report(node, "removed")
        for index in range(1, MAX_NODES + 1):
            sysx.delete_link(self.veth(index))
        for leftover in sysx.mounts_under(self.dir):
            sysx.unmount(leftover)
        sysx.delete_link(self.bridge)
        sysx.delete_nft_table(self.nft_table)
        with sysx.file_lock(GLOBAL_LOCK):
            shutil.rmtree(self.dir, ignore_errors=True)
            if release_cache and not list_labs():
                base.stop_cache()
