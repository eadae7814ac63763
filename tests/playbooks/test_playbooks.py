"""Fast checks of playbooks/ that need no lab: syntax, role layout, FQCNs, firewall rules.

The real proof (site.yml against lab hosts, twice) is the end-to-end lab test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.playbook.block import Block
from ansible.playbook.handler import Handler
from ansible.playbook.task import Task

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "playbooks"
ROLES = sorted(p for p in (PLAYBOOKS / "roles").iterdir() if (p / "tasks").is_dir())
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
GROUPS = ("lb", "app", "db", "cache", "monitoring")

# Keys of a task that are not its module.
TASK_KEYWORDS = (
    set(Task.fattributes) | set(Block.fattributes) | set(Handler.fattributes)
    | {"local_action", "with_items", "with_dict", "with_together", "with_nested"}
)  # fmt: skip


def _inventory(
    tmp_path: Path, layout: dict[str, tuple[list[str], str]], profile: str = "cluster"
) -> Path:
    """An inventory shaped like the one `imcloud init` writes (installer/core/cloud.py)."""
    groups: dict[str, Any] = {g: {"hosts": {}} for g in GROUPS}
    hosts = {}
    for name, (roles, address) in layout.items():
        hosts[name] = {"ansible_host": address, "imcloud_internal_address": address}
        for role in roles:
            groups[role]["hosts"][name] = None
    inventory = {
        "all": {
            "vars": {
                "imcloud_domain": "chat.example.test",
                "imcloud_tls_mode": "internal",
                "imcloud_profile": profile,
            },
            "children": {"imcloud": {"hosts": hosts, "children": groups}},
        }
    }
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


SINGLE = {"one": (list(GROUPS), "10.0.0.5")}
CLUSTER = {
    "lb1": (["lb"], "10.0.0.10"),
    "app1": (["app"], "10.0.0.11"),
    "app2": (["app"], "10.0.0.12"),
    "data1": (["db", "cache", "monitoring"], "10.0.0.13"),
}
HA = {
    "n1": (["lb", "app", "db", "cache"], "10.0.0.21"),
    "n2": (["lb", "app", "db", "cache"], "10.0.0.22"),
    "n3": (["app", "db", "cache", "monitoring"], "10.0.0.23"),
}


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "0"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_site_yml_passes_the_syntax_check(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path, CLUSTER)
    proc = _run([ANSIBLE_PLAYBOOK, "--syntax-check", "-i", str(inventory), "playbooks/site.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_site_yml_is_plays_of_roles_only() -> None:
    plays = yaml.safe_load((PLAYBOOKS / "site.yml").read_text())
    assert plays[-1] == {"name": "Monitoring", "import_playbook": "monitoring.yml"}
    for play in plays[:-1]:
        assert not {"tasks", "pre_tasks", "post_tasks"} & play.keys(), play["name"]
        assert play["any_errors_fatal"] is True, play["name"]
        for role in play["roles"]:
            assert role["tags"], f"{play['name']}: role {role['role']} has no tag"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_declares_its_arguments(role: Path) -> None:
    specs_file = role / "meta" / "argument_specs.yml"
    assert specs_file.is_file(), f"{role.name}: meta/argument_specs.yml is missing"
    options = yaml.safe_load(specs_file.read_text())["argument_specs"]["main"].get("options", {})
    defaults_file = role / "defaults" / "main.yml"
    defaults = yaml.safe_load(defaults_file.read_text()) if defaults_file.is_file() else {}
    undeclared = sorted(set(defaults or {}) - set(options))
    assert not undeclared, f"{role.name}: defaults without an argument spec: {undeclared}"
    for name, spec in options.items():
        assert spec.get("description"), f"{role.name}: {name} has no description"


def _modules(tasks: list[dict[str, Any]] | None) -> list[str]:
    found = []
    for task in tasks or []:
        for nested in ("block", "rescue", "always"):
            found += _modules(task.get(nested))
        if not {"block"} & task.keys():
            found += [key for key in task if key not in TASK_KEYWORDS]
    return found


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_uses_fully_qualified_module_names(role: Path) -> None:
    files = sorted((role / "tasks").glob("*.yml")) + sorted((role / "handlers").glob("*.yml"))
    modules = [m for f in files for m in _modules(yaml.safe_load(f.read_text()))]
    assert modules, f"{role.name}: no tasks found"
    short = sorted({m for m in modules if m.count(".") < 2})
    assert not short, f"{role.name}: modules without FQCN: {short}"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_templates_start_with_ansible_managed(role: Path) -> None:
    for template in sorted((role / "templates").glob("*.j2")):
        lines = template.read_text().splitlines()
        first = lines[1] if lines[0].startswith("#jinja2:") else lines[0]
        # Redis rejects comments in its ACL file: the one documented exception.
        if template.name == "users.acl.j2":
            continue
        assert "ansible_managed" in first, f"{role.name}/templates/{template.name}"


def _local_play(name: str) -> str:
    """Head of a play over the test inventory's hosts that runs on the controller.
    The plays are `.format`-ed afterwards, so Jinja braces are doubled."""
    return f"""
- name: {name}
  hosts: imcloud
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{{{{{{{ ansible_playbook_python }}}}}}}}"
  tasks:
"""


RENDER_PLAY = _local_play("Render the firewall rules of every host") + """\
    - name: Load the common role's defaults and vars
      ansible.builtin.include_vars:
        file: "{{{{ item }}}}"
      loop: ["{defaults}", "{vars}"]
    - name: Render nftables.conf
      ansible.builtin.template:
        src: {template}
        dest: "{out}/{{{{ inventory_hostname }}}}.nft"
        lstrip_blocks: true
        mode: "0644"
"""


def _render_firewall(
    tmp_path: Path, layout: dict[str, tuple[list[str], str]], profile: str = "cluster"
) -> dict[str, str]:
    role = PLAYBOOKS / "roles" / "common"
    out = tmp_path / "rendered"
    out.mkdir()
    play = tmp_path / "render.yml"
    play.write_text(
        RENDER_PLAY.format(
            defaults=role / "defaults" / "main.yml",
            vars=role / "vars" / "main.yml",
            template=role / "templates" / "nftables.conf.j2",
            out=out,
        )
    )
    inventory = _inventory(tmp_path, layout, profile)
    proc = _run([ANSIBLE_PLAYBOOK, "-i", str(inventory), str(play)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {p.stem: p.read_text() for p in out.glob("*.nft")}


def _rule(port: int, sources: list[str]) -> str:
    return f"ip saddr {{ {', '.join(sources)} }} tcp dport {port} accept"


def test_firewall_for_a_single_host_allows_internal_ports_only_from_itself(
    tmp_path: Path,
) -> None:
    rules = _render_firewall(tmp_path, SINGLE)["one"]
    assert "policy drop;" in rules
    assert "tcp dport { 22, 80, 443 } accept" in rules
    for port in (8080, 5432, 6379, 9100, 9187, 9121, 9113, 9115, 9090, 9093):
        assert _rule(port, ["10.0.0.5"]) in rules


def test_firewall_for_a_cluster_allows_each_port_only_from_its_groups(tmp_path: Path) -> None:
    rendered = _render_firewall(tmp_path, CLUSTER)
    assert sorted(rendered) == ["app1", "app2", "data1", "lb1"]
    expected = {
        8080: ["10.0.0.10", "10.0.0.13"],  # lb, monitoring
        5432: ["10.0.0.11", "10.0.0.12", "10.0.0.13"],  # app, monitoring
        6379: ["10.0.0.11", "10.0.0.12", "10.0.0.13"],
        9100: ["10.0.0.13"],
        9187: ["10.0.0.13"],
        9090: ["10.0.0.10"],  # lb only
        9093: ["10.0.0.10", "10.0.0.13"],
    }
    for rules in rendered.values():
        for port, sources in expected.items():
            lines = [line.strip() for line in rules.splitlines() if f"dport {port} " in line]
            assert lines == [_rule(port, sources)], (port, lines)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root and nftables"
)

def test_firewall_opens_the_ha_ports_only_on_profile_ha(tmp_path: Path) -> None:
    (tmp_path / "ha").mkdir()
    ha = _render_firewall(tmp_path / "ha", HA, profile="ha")
    everyone = ["10.0.0.21", "10.0.0.22", "10.0.0.23"]
    expected = {
        2379: everyone,  # etcd clients: db
        2380: everyone,
        2381: ["10.0.0.23"],  # etcd metrics: monitoring
        8008: everyone,  # Patroni REST API: db, monitoring
        26379: everyone,  # Sentinels: app, cache
    }
    for rules in ha.values():
        for port, sources in expected.items():
            assert _rule(port, sources) in rules, port
        assert "ip saddr { 10.0.0.21, 10.0.0.22 } meta l4proto 112 accept" in rules
    (tmp_path / "cluster").mkdir()
    cluster = _render_firewall(tmp_path / "cluster", CLUSTER)
    for rules in cluster.values():
        for ha_only in ("l4proto 112", "dport 2379", "dport 26379"):
            assert ha_only not in rules


def test_rendered_firewall_is_accepted_by_nft(tmp_path: Path) -> None:
    for name, rules in _render_firewall(tmp_path, CLUSTER).items():
        path = tmp_path / f"{name}.check.nft"
        path.write_text(rules)
        proc = _run(["nft", "-c", "-f", str(path)])
        assert proc.returncode == 0, f"{name}: {proc.stderr}"


SECRETS = (
    "imcloud_postgres_password", "imcloud_postgres_monitor_password", "imcloud_redis_password",
    "imcloud_redis_monitor_password", "imcloud_admin_token", "imcloud_token_secret",
    "imcloud_monitoring_password",
)  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"imcloud_admin_token": ""}, "secret imcloud_admin_token is missing or empty"),
        ({"imcloud_tls_mode": "acme"}, "tls mode acme: set tls.acme_directory_url"),
        (
            {
                "imcloud_tls_mode": "acme",
                "imcloud_acme_directory_url": "https://acme.example/dir",
                "imcloud_acme_email": "ops@example.com",
                "imcloud_acme_ca_bundle": "/nonexistent/acme-ca.pem",
            },
            "tls.acme_ca_bundle must name a readable file",
        ),
        ({"imcloud_release": "0.0.0-other"}, "must name a release built by installer.core.wheels"),
    ],
)
def test_bad_input_stops_site_yml_before_any_host_is_touched(
    tmp_path: Path, override: dict[str, str], message: str
) -> None:
    """The boilerplate play fails on the controller; the (unreachable) hosts are never tried."""
    ca = tmp_path / "ca"
    ca.mkdir()
    (ca / "ca.crt").write_text("x")
    (ca / "ca.key").write_text("x")
    wheel_dir = tmp_path / "release"
    wheel_dir.mkdir()
    (wheel_dir / "release.json").write_text('{"id": "0.1.0-abc"}')
    extra = {
        **dict.fromkeys(SECRETS, "s3cret"),
        "imcloud_ca_dir": str(ca),
        "imcloud_wheel_dir": str(wheel_dir),
        "imcloud_release": "0.1.0-abc",
        **override,
    }
    (tmp_path / "extra.yml").write_text(yaml.safe_dump(extra))
    inventory = _inventory(tmp_path, {"one": (list(GROUPS), "192.0.2.1")})
    proc = _run(
        [ANSIBLE_PLAYBOOK, "-i", str(inventory), "-e", f"@{tmp_path / 'extra.yml'}",
         "playbooks/site.yml"]
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in output, output
    assert "192.0.2.1" not in output and "UNREACHABLE" not in output, output


# Each role, the inventory group whose hosts run it (site.yml, monitoring.yml) and
# the variable of its package list.
ROLE_PACKAGES = {
    "tls": ("imcloud", "__tls_packages"),
    "exporters": ("imcloud", "__exporters_install_packages"),
    "postgresql": ("db", "__postgresql_packages"),
    "redis": ("cache", "__redis_packages"),
    "nginx": ("lb", "__nginx_packages"),
    "monitoring": ("monitoring", "__monitoring_packages"),
}

PACKAGES_PLAY = _local_play(
    "Compare each role's packages with the common role's one apt transaction"
) + """\
    - name: Load the roles' defaults and vars
      ansible.builtin.include_vars:
        file: "{{{{ item }}}}"
      loop: {files}
    - name: Each role's packages are already in the common role's list
      ansible.builtin.assert:
        that: lookup('vars', item.value[1]) is subset(__common_install_packages)
        fail_msg: "{{{{ item.key }}}} installs {{{{ lookup('vars', item.value[1])
          | difference(__common_install_packages) }}}} in its own apt run"
      loop: "{{{{ {role_packages} | dict2items
        | selectattr('value.0', 'in', group_names + ['imcloud']) }}}}"
"""


@pytest.mark.parametrize("layout", [SINGLE, CLUSTER], ids=["single", "cluster"])
def test_common_installs_every_package_of_the_host_s_roles(
    tmp_path: Path, layout: dict[str, tuple[list[str], str]]
) -> None:
    """The roles skip their apt run when common has installed their packages (one transaction)."""
    files = [
        str(PLAYBOOKS / "roles" / role / kind / "main.yml")
        for role in ["common", *ROLE_PACKAGES]
        for kind in ("defaults", "vars")
        if (PLAYBOOKS / "roles" / role / kind / "main.yml").is_file()
    ]
    play = tmp_path / "packages.yml"
    play.write_text(PACKAGES_PLAY.format(files=files, role_packages=ROLE_PACKAGES))
    # Time sync depends on facts (not in a container); off, the list needs none.
    inventory = str(_inventory(tmp_path, layout))
    no_timesync = '{"common_timesync_enabled": false}'
    proc = _run([ANSIBLE_PLAYBOOK, "-i", inventory, "-e", no_timesync, str(play)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
