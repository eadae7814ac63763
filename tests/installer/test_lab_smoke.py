"""One real lab: two Debian 12 hosts booted, reached, isolated, and removed without a trace."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from installer.core import lab_base, lab_system
from installer.core.lab import Lab, LabHost, list_labs
from installer.errors import ImcloudError

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                       reason="needs root and systemd-nspawn (bash scripts/setup.sh)"),
]


def ssh(host: LabHost, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", *host.ssh_args(), command], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def leftovers(lab: Lab, node_names: list[str]) -> list[str]:
    """Everything of the lab still present on the machine, described one per line."""
    found = [f"netns {ns}" for ns in lab_system.list_netns(f"imlab-{lab.name}-")]
    found += [f"mount {m}" for m in lab_system.mounts_under(lab.dir)]
    found += [f"link {lab.bridge}"] if lab_system.link_exists(lab.bridge) else []
    found += [f"veth {lab.veth(i)}" for i in range(1, len(node_names) + 1)
              if lab_system.link_exists(lab.veth(i))]
    found += [f"process {pid}" for n in node_names for pid in lab_system.nspawn_pids(lab.netns(n))]
    found += [f"nft table {lab.nft_table}"] if lab_system.nft_table_exists(
        "inet", lab.nft_table) else []
    found += [f"dir {lab.dir}"] if lab.dir.exists() else []
    return found


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(f"smoke-{secrets.token_hex(3)}")
    try:
        yield lab
    finally:
        lab.down()


@pytest.mark.timeout(600)  # a cold base build on a fresh machine is part of the first run
def test_two_hosts_boot_talk_use_the_cache_and_leave_nothing_behind(lab: Lab) -> None:
    phases: list[tuple[str, str]] = []
    hosts = lab.up(2, progress=lambda node, phase: phases.append((node, phase)))
    assert [h.name for h in hosts] == ["node1", "node2"]
    assert {node for node, phase in phases if phase.startswith("ready")} == {"node1", "node2"}

    for host in hosts:
        result = ssh(host, "hostname && systemctl is-system-running")
        assert result.returncode in (0, 1), result.stderr  # 1: "degraded" is accepted
        name, state = result.stdout.split()
        assert name == host.name and state in ("running", "degraded")

    node1, node2 = hosts
    # Host keys are made per host (not shared from the base), and SSH checked them strictly.
    keys = [line.split()[2] for line in lab.known_hosts_path.read_text().splitlines()
            if " ssh-ed25519 " in line]
    assert len(keys) == 2 and keys[0] != keys[1]

    ping = ssh(node1, f"ping -c 2 -W 2 {node2.address} && ping -c 1 -W 2 node2 && "
                      f"ping -c 1 -W 2 {lab.controller_address()}")
    assert ping.returncode == 0, ping.stdout + ping.stderr

    routes = ssh(node1, "ip -4 route show default; ip route get 1.1.1.1")
    assert "default" not in routes.stdout, routes.stdout
    assert "unreachable" in routes.stderr.lower(), routes.stderr

    update = ssh(node2, "apt-get -q update", timeout=240)
    assert update.returncode == 0, update.stdout[-800:] + update.stderr[-800:]
    proxy = ssh(node2, "apt-config dump Acquire::http::Proxy").stdout
    assert lab_base.cache_proxy_url() in proxy, proxy

    # What later roles need inside a host: nftables in its own netns, net.* sysctls.
    nft = ssh(node1, "nft add table inet imcloudprobe && nft list ruleset && "
                     "nft delete table inet imcloudprobe && sysctl -w net.core.somaxconn=4096")
    assert nft.returncode == 0, nft.stderr
    assert "table inet imcloudprobe" in nft.stdout

    # The controller drops anything routed in or out of the lab bridge.
    guard = lab_system.run(["nft", "list", "table", "inet", lab.nft_table]).stdout
    assert guard.count("drop") == 2 and lab.bridge in guard

    inventory = yaml.safe_load(lab.inventory_path.read_text())
    (group,) = inventory["all"]["children"].values()
    assert {n: v["ansible_host"] for n, v in group["hosts"].items()} == {
        h.name: h.address for h in hosts}
    state = json.loads(lab.state_path.read_text())
    assert [(n["name"], n["address"]) for n in state["nodes"]] == [
        (h.name, h.address) for h in hosts]
    assert Path(state["key"]) == node1.private_key_file

    # Same size again reuses the running hosts; another size is refused untouched.
    pids = {h.name: lab_system.nspawn_pids(lab.netns(h.name)) for h in hosts}
    assert lab.up(2) == hosts
    assert pids == {h.name: lab_system.nspawn_pids(lab.netns(h.name)) for h in hosts}
    with pytest.raises(ImcloudError, match="is up with 2 nodes"):
        lab.up(3)
    assert all(s.running for s in lab.status().nodes)

    lab.down()
    assert leftovers(lab, ["node1", "node2"]) == []
    assert not lab.status().exists
    lab.down()  # safe twice
    if not list_labs():
        assert lab_base.cache_pid() is None


@pytest.mark.timeout(600)
def test_up_and_down_recover_from_a_crash(lab: Lab) -> None:
    lab.up(1)
    netns = lab.netns("node1")
    # Crash 1: systemd-nspawn killed hard and the state file lost; the host's processes linger.
    lab_system.signal_pids(lab_system.nspawn_pids(netns), signal.SIGKILL)
    lab.state_path.unlink()
    assert lab_system.netns_exists(netns)
    (host,) = lab.up(1)  # cleans the leftovers, boots afresh
    assert ssh(host, "true").returncode == 0
    # Crash 2: state lost while the host runs; down still finds and removes everything.
    lab.state_path.unlink()
    lab.down()
    assert leftovers(lab, ["node1"]) == []
