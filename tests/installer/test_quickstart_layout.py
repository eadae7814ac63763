"""Quickstart's lab layouts are valid configs with the roles where the docs say."""

from __future__ import annotations

from pathlib import Path

import pytest

from installer.core.config import parse_config
from installer.core.lab import LabHost
from installer.core.quickstart import lab_cloud_config


def _hosts(n: int, tmp_path: Path) -> list[LabHost]:
    key, known = tmp_path / "id_ed25519", tmp_path / "known_hosts"
    key.write_text("not a real key")
    known.write_text("")
    return [LabHost(f"node{i}", f"10.213.9.{10 + i}", "root", key, known) for i in range(1, n + 1)]


@pytest.mark.parametrize("nodes", [1, 2, 3, 4, 5])
def test_every_lab_size_gives_a_valid_config(nodes: int, tmp_path: Path) -> None:
    config = parse_config(lab_cloud_config(_hosts(nodes, tmp_path)))
    assert config.profile == ("single" if nodes == 1 else "cluster")
    assert config.ssh.strict_host_key_checking
    assert config.ssh.known_hosts_file == tmp_path / "known_hosts"


def test_three_nodes_put_two_app_nodes_beside_the_edge_host(tmp_path: Path) -> None:
    config = parse_config(lab_cloud_config(_hosts(3, tmp_path)))
    roles = {h.name: set(h.roles) for h in config.hosts}
    assert roles == {
        "node1": {"lb", "db", "cache", "monitoring"},
        "node2": {"app"},
        "node3": {"app"},
    }
