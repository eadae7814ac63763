"""imcloud status: every component's health from Prometheus, in one table.

On profile ha also who is PostgreSQL primary and sync standby and Redis master.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from installer.commands.options import CloudDir, JsonOutput
from installer.console import console, err_console, operator_errors, print_json
from installer.core.cloud import DEFAULT_CLOUD_DIR, Cloud
from installer.core.status import (
    ComponentStatus,
    HaRoles,
    Via,
    collect_ha_roles,
    collect_status,
    monitoring_apis,
)


class ViaChoice(StrEnum):
    ssh = "ssh"
    nginx = "nginx"

    def mode(self) -> Via:
        return "nginx" if self is ViaChoice.nginx else "ssh"


ViaOption = Annotated[
    ViaChoice,
    typer.Option(
        "--via",
        help="Reach Prometheus through an SSH port forward to the monitoring host, "
        "or through nginx (/prometheus/, basic auth).",
    ),
]

_COLOURS = {"ok": "green", "degraded": "yellow", "down": "bold red"}


def _table(rows: list[ComponentStatus]) -> Table:
    table = Table(title="imcloud status")
    for column in ("component", "host", "instance", "health", "figures", "firing alerts"):
        table.add_column(column)
    for row in rows:
        colour = _COLOURS[row.health]
        figures = "  ".join(f"{k} {v}" for k, v in row.figures.items())
        table.add_row(
            row.job, row.host, row.instance, f"[{colour}]{row.health}[/]", figures,
            ", ".join(row.alerts),
        )  # fmt: skip
    return table


def _ha_table(roles: HaRoles) -> Table:
    table = Table(title="ha roles (from Prometheus)")
    table.add_column("role")
    table.add_column("host")
    table.add_column("named by")
    rows = [
        ("PostgreSQL primary", roles.postgres_primary, "Patroni"),
        ("PostgreSQL sync standby", roles.postgres_sync_standby, "Patroni"),
    ]
    for role, hosts, source in rows:
        table.add_row(role, ", ".join(hosts) or "[bold red]none[/]", source)
    masters = roles.redis_master or {"[bold red]none[/]": []}
    for master, sentinels in masters.items():
        table.add_row("Redis master", master, "Sentinels " + ", ".join(sentinels))
    for problem in roles.problems:
        table.add_row("[bold red]problem[/]", problem, "")
    return table


@operator_errors
def status(
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
    json_output: JsonOutput = False,
    via: ViaOption = ViaChoice.ssh,
) -> None:
    """Show each component's health from Prometheus: up, key figures, firing alerts.

    On profile ha also which db host is the PostgreSQL primary and sync standby
    (Patroni) and which cache host the Sentinels name as Redis master.
    Exits 1 if any component is down or an ha role is held by none or several.
    """
    loaded = Cloud.load(cloud)
    names = {h.internal_address: h.name for h in loaded.hosts}
    roles = None
    with err_console.status("asking Prometheus"), monitoring_apis(loaded, via.mode()) as apis:
        rows = collect_status(apis.prometheus, names)
        if loaded.config.profile == "ha":
            roles = collect_ha_roles(apis.prometheus, names)
    if json_output:
        report: dict[str, object] = {"components": [row.as_dict() for row in rows]}
        if roles:
            report["ha"] = roles.as_dict()
        print_json(report)
    else:
        console.print(_table(rows))
        if roles:
            console.print(_ha_table(roles))
    if any(row.health == "down" for row in rows) or (roles and roles.problems):
        raise typer.Exit(code=1)
