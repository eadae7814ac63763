"""imcloud check: read-only preflight of every host before install."""

from __future__ import annotations

import typer
from rich.table import Table

from installer.commands.options import CloudDir, JsonOutput
from installer.console import console, err_console, operator_errors, print_json
from installer.core import preflight
from installer.core.cloud import DEFAULT_CLOUD_DIR, Cloud


def _table(report: preflight.CheckReport) -> Table:
    table = Table(title="imcloud check")
    table.add_column("host")
    table.add_column("check")
    table.add_column("result")
    for host in report.hosts:
        for finding in host.findings:
            mark = "[green]ok[/]" if finding.ok else "[bold red]FAIL[/]"
            table.add_row(host.host, finding.check, f"{mark} {finding.detail}")
    return table


@operator_errors
def check(cloud: CloudDir = DEFAULT_CLOUD_DIR, json_output: JsonOutput = False) -> None:
    """Check every host before install: SSH, Debian 12, systemd, python3, size, ports, clock.

    Read-only on the hosts. Exits 1 if any host fails, one line per problem.
    """
    loaded = Cloud.load(cloud)
    with err_console.status(f"checking {len(loaded.hosts)} host(s)"):
        report = preflight.check_cloud(loaded)
    if json_output:
        print_json(report.to_dict())
    else:
        console.print(_table(report))
    if not report.ok:
        for line in report.failure_lines():
            err_console.print(line, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=1)
    if not json_output:
        console.print(f"[bold green]all {len(report.hosts)} host(s) ready[/]")
