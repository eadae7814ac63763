"""Pure parts of the lab: names, addresses, rendered files, and refusals before any change."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from installer.cli import app
from installer.core import lab as labmod
from installer.core.lab import (
    MAX_NODES,
    Lab,
    LabHost,
    allocate_subnet,
    gateway_address,
    host_address,
    render_etc_hosts,
    render_inventory,
    render_known_hosts,
    validate_name,
    validate_nodes,
)
from installer.errors import ImcloudError

runner = CliRunner()


@pytest.mark.parametrize("name", ["a", "demo", "e2e-cluster", "x" * 24, "lab-7"])
def test_valid_lab_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Demo", "7lab", "x" * 25, "a_b", "a/b", "-a", "a b"])
def test_invalid_lab_names_are_refused(name: str) -> None:
    with pytest.raises(ImcloudError, match="invalid lab name"):
        validate_name(name)


@pytest.mark.parametrize("nodes", [0, -1, MAX_NODES + 1])
def test_node_count_out_of_range_is_refused(nodes: int) -> None:
    with pytest.raises(ImcloudError, match="--nodes must be between 1"):
        validate_nodes(nodes)


def test_interface_names_fit_the_kernel_limit() -> None:
    lab = Lab("x" * 24)
    names = [lab.bridge, lab.veth(MAX_NODES), "imlp" + lab.veth(MAX_NODES)[4:]]
    assert all(len(n) <= 15 for n in names), names
    assert len(lab.nft_table) < 64


def test_subnet_is_stable_per_name_and_avoids_taken_ones() -> None:
    first = allocate_subnet("demo", set())
    assert first == allocate_subnet("demo", set())
    assert first.prefixlen == 24 and first.subnet_of(ipaddress.IPv4Network("10.213.0.0/16"))
    index = int(str(first.network_address).split(".")[2])
    second = allocate_subnet("demo", {index})
    assert second != first
    assert allocate_subnet("other", set()) != first or allocate_subnet("other", {index}) != first


def test_subnet_never_uses_the_cache_range_and_fails_when_full() -> None:
    for name in ("a", "b", "c", "demo", "e2e"):
        assert str(allocate_subnet(name, set()).network_address) != "10.213.0.0"
    only_free = allocate_subnet("demo", set(range(1, 255)) - {200})
    assert str(only_free) == "10.213.200.0/24"
    with pytest.raises(ImcloudError, match="no free lab subnet"):
        allocate_subnet("demo", set(range(1, 255)))


def test_addresses_in_a_subnet() -> None:
    subnet = ipaddress.IPv4Network("10.213.5.0/24")
    assert gateway_address(subnet) == "10.213.5.1"
    assert [host_address(subnet, i) for i in (1, 2, 3)] == ["10.213.5.11", "10.213.5.12",
                                                           "10.213.5.13"]
    assert ipaddress.IPv4Address(host_address(subnet, MAX_NODES)) in subnet


def _hosts(tmp_path: Path) -> list[LabHost]:
    key, known = tmp_path / "id_ed25519", tmp_path / "known_hosts"
    return [LabHost(f"node{i}", f"10.213.5.{10 + i}", "root", key, known) for i in (1, 2)]


def test_inventory_lists_hosts_with_key_user_and_known_hosts(tmp_path: Path) -> None:
    doc = yaml.safe_load(render_inventory(_hosts(tmp_path), "e2e-x"))
    group = doc["all"]["children"]["lab_e2e_x"]["hosts"]
    assert group == {"node1": {"ansible_host": "10.213.5.11"},
                     "node2": {"ansible_host": "10.213.5.12"}}
    vars_ = doc["all"]["vars"]
    assert vars_["ansible_user"] == "root"
    assert vars_["ansible_ssh_private_key_file"] == str(tmp_path / "id_ed25519")
    assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in vars_["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=yes" in vars_["ansible_ssh_common_args"]


def test_inventory_needs_a_host() -> None:
    with pytest.raises(ImcloudError):
        render_inventory([], "demo")


def test_known_hosts_and_etc_hosts(tmp_path: Path) -> None:
    known = render_known_hosts([("node1", "10.213.5.11",
                                 ["ssh-ed25519 AAAAkey root@build", "ecdsa-sha2-nistp256 BBBB"])])
    assert known.splitlines() == ["node1,10.213.5.11 ssh-ed25519 AAAAkey",
                                  "node1,10.213.5.11 ecdsa-sha2-nistp256 BBBB"]
    hosts = render_etc_hosts("node1", [("node1", "10.213.5.11"), ("node2", "10.213.5.12")])
    assert "127.0.0.1\tlocalhost" in hosts
    assert "10.213.5.12\tnode2" in hosts.splitlines()


def test_ssh_args_use_the_lab_key_and_strict_known_hosts(tmp_path: Path) -> None:
    args = _hosts(tmp_path)[0].ssh_args()
    assert args[-1] == "root@10.213.5.11"
    assert ["-i", str(tmp_path / "id_ed25519")] == args[:2]
    assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in args
    assert "StrictHostKeyChecking=yes" in args


# -- refusals: one line, exit 1, nothing created -------------------------------

def _assert_one_line_error(args: list[str], expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output


def test_cli_refuses_bad_name_and_node_count() -> None:
    _assert_one_line_error(["lab", "up", "--name", "Bad_Name"], "invalid lab name")
    _assert_one_line_error(["lab", "up", "--name", "okname", "--nodes", "0"], "--nodes must be")
    assert not (labmod.LABS_ROOT / "okname").exists()


def test_non_root_is_refused_before_any_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    _assert_one_line_error(["lab", "up", "--name", "nonroot"], "needs root")
    _assert_one_line_error(["lab", "down", "--name", "nonroot"], "needs root")
    assert not (labmod.LABS_ROOT / "nonroot").exists()


def test_missing_tools_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    monkeypatch.setenv("PATH", str(tmp_path))
    _assert_one_line_error(["lab", "up", "--name", "notools"], "systemd-nspawn")
    assert not (labmod.LABS_ROOT / "notools").exists()


def test_ssh_to_a_lab_that_is_not_up_is_refused() -> None:
    _assert_one_line_error(["lab", "ssh", "--name", "never-booted", "node1"], "is not up")


def test_status_of_a_missing_lab() -> None:
    result = runner.invoke(app, ["lab", "status", "--name", "never-booted", "--json"])
    assert result.exit_code == 0, result.output
    assert '"exists": false' in result.output
