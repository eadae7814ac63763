"""imcloud verify: the testinfra suite against every host, a table and a summary."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from installer.commands.options import CloudDir, JsonOutput
from installer.console import console, err_console, operator_errors, print_json
from installer.core import verify as core
from installer.core.cloud import DEFAULT_CLOUD_DIR, Cloud

_STYLE = {
    "passed": "[green]passed[/]",
    "skipped": "[yellow]skipped[/]",
    "failed": "[bold red]FAILED[/]",
    "error": "[bold red]ERROR[/]",
}


def _table(report: core.VerifyReport) -> Table:
    table = Table(title="imcloud verify")
    for column in ("area", "check", "host", "result", "detail"):
        table.add_column(column, overflow="fold")
    for r in report.results:
        # the host has its own column: "x[node1-nginx]" reads "x nginx", "x[node1]" reads "x"
        check = r.check.replace(f"[{r.target}-", " ").replace(f"[{r.target}]", "")
        check = check.replace("[", " ").rstrip("]")
        outcome = _STYLE.get(r.outcome, escape(r.outcome))
        table.add_row(r.area, escape(check), r.target, outcome, escape(r.message))
    return table


@operator_errors
def verify(cloud: CloudDir = DEFAULT_CLOUD_DIR, json_output: JsonOutput = False) -> None:
    """Test the installed cloud on every host: services, sockets, firewall, TLS, secrets,
    a real message across app nodes, monitoring. Exits 1 if any check fails."""
    loaded = Cloud.load(cloud)
    with err_console.status("verifying") as status:

        def progress(result: core.CheckResult) -> None:
            status.update(f"verifying: {result.area}/{result.check} on {result.target}")

        report = core.run_verify(loaded, on_result=progress)
    if json_output:
        print_json(report.to_dict())
    else:
        console.print(_table(report))
        counts = ", ".join(f"{n} {k}" for k, n in report.counts().items() if n)
        console.print(
            f"{counts or 'no checks ran'} in {report.duration_s:.0f} s; log: {report.log_path}",
            highlight=False,
        )
    if not report.ok:
        err_console.print("[bold red]verify failed:[/]")
        for line in report.failure_lines():
            err_console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=1)
    if not json_output:
        console.print("[bold green]the cloud works as designed[/]")
