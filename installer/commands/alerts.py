"""imcloud alerts: list firing alerts; `imcloud alerts test` checks every receiver."""

from __future__ import annotations

import typer
from rich.table import Table

from installer.commands.options import CloudDir, JsonOutput
from installer.commands.status import ViaChoice, ViaOption
from installer.console import console, err_console, operator_errors, print_json
from installer.core import alerts as core
from installer.core.cloud import DEFAULT_CLOUD_DIR, Cloud
from installer.core.status import monitoring_apis

app = typer.Typer(
    help="Firing alerts, and test notifications to every receiver.",
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
@operator_errors
def alerts(
    ctx: typer.Context,
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
    json_output: JsonOutput = False,
    via: ViaOption = ViaChoice.ssh,
) -> None:
    """List the alerts firing now (silenced, inhibited and the Watchdog left out)."""
    if ctx.invoked_subcommand is not None:
        return
    loaded = Cloud.load(cloud)
    with err_console.status("asking Alertmanager"), monitoring_apis(loaded, via.mode()) as apis:
        firing = core.firing_alerts(apis.alertmanager)
    if json_output:
        print_json({"alerts": [a.as_dict() for a in firing]})
        return
    if not firing:
        console.print("[green]no alerts firing[/]")
        return
    table = Table(title="firing alerts")
    for column in ("alert", "severity", "instance", "since", "summary", "sent to"):
        table.add_column(column)
    for a in firing:
        table.add_row(
            a.name, a.severity, a.instance, a.since[:19], a.summary, ", ".join(a.receivers)
        )
    console.print(table)


@app.command("test")
@operator_errors
def test(
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
    json_output: JsonOutput = False,
    via: ViaOption = ViaChoice.ssh,
) -> None:
    """Send a test alert through Alertmanager to every receiver; report which accepted it.

    Exits 1 if any receiver did not accept it.
    """
    loaded = Cloud.load(cloud)
    receivers = loaded.config.alerts.receivers
    with monitoring_apis(loaded, via.mode()) as apis:
        with err_console.status(f"sending test alerts to {len(receivers)} receiver(s)"):
            results = core.send_test_alerts(apis.alertmanager, receivers)
    if json_output:
        print_json({"receivers": [r.as_dict() for r in results]})
    else:
        table = Table(title="imcloud alerts test")
        for column in ("receiver", "type", "result"):
            table.add_column(column)
        for r in results:
            mark = "[green]accepted[/]" if r.accepted else "[bold red]FAILED[/]"
            table.add_row(r.name, r.integration, f"{mark} {r.detail}")
        console.print(table)
    if not all(r.accepted for r in results):
        raise typer.Exit(code=1)
