"""imcloud status: every component's health from Prometheus, in one table."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from installer.commands.options import CloudDir, JsonOutput
from installer.console import console, err_console, operator_errors, print_json
from installer.core.cloud import DEFAULT_CLOUD_DIR, Cloud
from installer.core.status import ComponentStatus, Via, collect_status, monitoring_apis


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


@operator_errors
def status(
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
    json_output: JsonOutput = False,
    via: ViaOption = ViaChoice.ssh,
) -> None:
    """Show each component's health from Prometheus: up, key figures, firing alerts.

    Exits 1 if any component is down.
    """
    loaded = Cloud.load(cloud)
    names = {h.internal_address: h.name for h in loaded.hosts}
    with err_console.status("asking Prometheus"), monitoring_apis(loaded, via.mode()) as apis:
        rows = collect_status(apis.prometheus, names)
    if json_output:
        print_json({"components": [row.as_dict() for row in rows]})
    else:
        console.print(_table(rows))
    if any(row.health == "down" for row in rows):
        raise typer.Exit(code=1)
