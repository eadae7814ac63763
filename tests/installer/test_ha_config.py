"""Profile ha in `imcloud.yml`: layouts that survive one lost host, and clear refusals."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from installer.cli import app
from installer.core.cloud import init_cloud
from installer.core.config import parse_config, survival_problems
from installer.errors import ImcloudError
from tests.installer.layouts import HA

runner = CliRunner()



def _with(change: dict[str, Any] | None = None, **roles: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(HA)
    data.update(change or {})
    for host in data["hosts"]:
        if host["name"] in roles:
            host["roles"] = roles[host["name"]]
    return data


def test_three_hosts_sharing_every_role_survive_one_loss(tmp_path: Path) -> None:
    config = parse_config(HA)
    assert survival_problems(config) == []
    cloud, _ = init_cloud(tmp_path / "cloud", config)
    inventory = yaml.safe_load(cloud.inventory_path.read_text())
    global_vars = inventory["all"]["vars"]
    assert global_vars["imcloud_profile"] == "ha"
    assert global_vars["imcloud_floating_address"] == "10.0.0.100"
    assert 1 <= global_vars["imcloud_vrrp_router_id"] <= 255
    groups = inventory["all"]["children"]["imcloud"]["children"]
    assert sorted(groups["db"]["hosts"]) == ["n1", "n2", "n3"]
    assert sorted(groups["lb"]["hosts"]) == ["n1", "n2"]
    written = yaml.safe_load(cloud.config_path.read_text())
    assert written["ha"]["floating_address"] == "10.0.0.100"
    assert parse_config(written) == config


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_with(n3=["app", "cache", "monitoring"]), "2 host(s) with role db, 3 needed"),
        (_with(n2=["app", "db", "cache"]), "1 host(s) with role lb, 2 needed"),
        (_with(n2=["lb", "db", "cache"], n3=["db", "cache"]), "1 host(s) with role app"),
        (_with(n1=["lb", "app", "db"]), "2 host(s) with role cache, 3 needed"),
        (_with({"ha": {}}), "needs ha.floating_address"),
        (_with({"ha": {"floating_address": "10.0.0.1"}}), "is a host's address"),
        (_with({"ha": {"floating_address": "not-an-ip"}}), "is not an IP address"),
        (
            _with(
                {
                    "tls": {
                        "mode": "acme",
                        "acme_directory_url": "https://acme.example.com/dir",
                        "acme_email": "ops@example.com",
                    }
                }
            ),
            "does not support tls.mode acme",
        ),
    ],
)
def test_layouts_that_cannot_survive_a_host_are_refused_with_the_reason(
    tmp_path: Path, data: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ImcloudError) as excinfo:
        parse_config(data)
    assert reason in str(excinfo.value)


def test_ha_settings_on_another_profile_are_refused() -> None:
    data = _with({"profile": "cluster"})
    with pytest.raises(ImcloudError, match="settings of profile ha, but profile is cluster"):
        parse_config(data)


def test_check_refuses_an_edited_ha_cloud_with_two_db_hosts(tmp_path: Path) -> None:
    cloud, _ = init_cloud(tmp_path / "cloud", parse_config(HA))
    written = yaml.safe_load(cloud.config_path.read_text())
    written["hosts"][2]["roles"] = ["app", "cache", "monitoring"]
    cloud.config_path.write_text(yaml.safe_dump(written))
    result = runner.invoke(app, ["check", "--cloud", str(cloud.dir)])
    assert result.exit_code == 1
    assert "2 host(s) with role db, 3 needed" in result.output
    assert "Traceback" not in result.output


def test_init_takes_the_ha_profile_from_options(tmp_path: Path) -> None:
    hosts = []
    for host in HA["hosts"]:
        hosts += ["--host", f"{host['name']}={host['address']},{','.join(host['roles'])}"]
    args = ["init", "--domain", "chat.example.com", "--profile", "ha", *hosts]
    result = runner.invoke(
        app, [*args, "--cloud", str(tmp_path / "c"), "--floating-address", "10.0.0.100"]
    )
    assert result.exit_code == 0, result.output
    refused = runner.invoke(app, [*args, "--cloud", str(tmp_path / "d")])
    assert refused.exit_code == 1
    assert "needs ha.floating_address" in refused.output
    assert not (tmp_path / "d").exists()


def test_survival_problems_explain_why_single_and_cluster_cannot_lose_their_db() -> None:
    cluster = parse_config(
        {
            "domain": "chat.example.com",
            "profile": "cluster",
            "hosts": [
                {"name": "lb1", "address": "192.0.2.10", "roles": ["lb", "db", "cache"]},
                {"name": "app1", "address": "192.0.2.11", "roles": ["app"]},
                {"name": "app2", "address": "192.0.2.12", "roles": ["app"]},
            ],
        }
    )
    assert survival_problems(cluster, roles=("app",)) == []
    (problem,) = survival_problems(cluster, roles=("db",))
    assert "profile cluster has one unreplicated db host" in problem
