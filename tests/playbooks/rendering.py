"""Render a role's template, or one of its variables, for the hosts of an inventory group,
with the role's defaults and vars, test secrets and the ha inventory variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.playbooks.test_playbooks import (
    ANSIBLE_PLAYBOOK,
    PLAYBOOKS,
    _inventory,
    _local_play,
    _run,
)

ROLES = PLAYBOOKS / "roles"
#: Every secret a rendered role may read, as ``pw-<name>``.
SECRETS = {
    name: f"pw-{name}"
    for name in (
        "imcloud_postgres_password",
        "imcloud_postgres_monitor_password",
        "imcloud_postgres_superuser_password",
        "imcloud_postgres_replication_password",
        "imcloud_patroni_api_password",
        "imcloud_redis_password",
        "imcloud_redis_monitor_password",
        "imcloud_redis_replication_password",
        "imcloud_redis_sentinel_password",
        "imcloud_monitoring_password",
        "imcloud_admin_token",
        "imcloud_token_secret",
    )
}
#: What `imcloud init` writes for profile ha besides the hosts.
HA_VARS = {
    "imcloud_floating_address": "10.0.0.100",
    "imcloud_vrrp_interface": "eth0",
    "imcloud_vrrp_router_id": 42,
    "imcloud_vrrp_password": "0123456789abcdef",
    "imcloud_release": "r1",
    "imcloud_wheel_dir": "/nonexistent",
}

RENDER_PLAY = (
    _local_play("Render a role's template (or a variable) on a group's hosts")
    + """\
    - name: Read the memory size (the PostgreSQL tuning and redis.conf's maxmemory need it)
      ansible.builtin.setup:
        gather_subset: ["!all", "!min", hardware]
    - name: Load the roles' defaults and vars
      ansible.builtin.include_vars:
        file: "{{{{ item }}}}"
      loop: {files}
    - name: Render
      ansible.builtin.copy:
        content: "{{{{ lookup('template', '{template}') if '{template}' else {variable} }}}}"
        dest: "{out}/{{{{ inventory_hostname }}}}"
        mode: "0600"
      when: inventory_hostname in groups['{group}']
"""
)


def render(
    tmp_path: Path,
    layout: dict[str, tuple[list[str], str]],
    profile: str,
    roles: str | list[str],
    group: str,
    *,
    template: str = "",
    variable: str = "''",
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """``template`` of the last of ``roles`` (or the value of ``variable``) on each ``group``
    host, with the variables of every role in ``roles``; host name -> text."""
    roles = [roles] if isinstance(roles, str) else roles
    files = [
        str(ROLES / role / kind / "main.yml")
        for kind in ("defaults", "vars")
        for role in roles
        if (ROLES / role / kind / "main.yml").is_file()
    ]
    out = tmp_path / "rendered"
    out.mkdir()
    play = tmp_path / "render.yml"
    path = str(ROLES / roles[-1] / "templates" / template) if template else ""
    play.write_text(
        RENDER_PLAY.format(files=files, template=path, variable=variable, out=out, group=group)
    )
    extra_file = tmp_path / "extra.yml"
    extra_file.write_text(yaml.safe_dump({**SECRETS, **HA_VARS, **(extra or {})}))
    inventory = _inventory(tmp_path, layout, profile)
    proc = _run([ANSIBLE_PLAYBOOK, "-i", str(inventory), "-e", f"@{extra_file}", str(play)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return {p.name: p.read_text() for p in out.iterdir()}
