"""imcloud install: provision every host, with live progress per host and phase."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from installer.commands.options import CloudDir, JsonOutput
from installer.console import console, err_console, operator_errors, print_json
from installer.core import install as core
from installer.core.cloud import DEFAULT_CLOUD_DIR, Cloud
from installer.core.runner import RunResult, RunState, log_tail


def _progress_table(state: RunState) -> Table:
    table = Table(title="imcloud install", expand=False)
    for column in ("host", "phase", "task", "ok", "changed", "failed"):
        table.add_column(column, overflow="ellipsis", max_width=48 if column == "task" else None)
    with state.lock:
        for host in state.hosts.values():
            phase = "[red]unreachable[/]" if host.unreachable else host.phase
            failed = f"[red]{host.failed}[/]" if host.failed else "0"
            table.add_row(host.name, phase, host.task, str(host.ok), str(host.changed), failed)
    return table


def _print_summary(cloud: Cloud, result: RunResult) -> None:
    timings = Table(title="phases (wall clock)")
    timings.add_column("phase")
    timings.add_column("seconds", justify="right")
    for phase in result.phases:
        timings.add_row(phase.name, f"{phase.seconds:.1f}")
    console.print(timings)
    console.print(_progress_table_final(result))
    if not result.ok:
        err_console.print(f"[bold red]install failed[/] after {result.duration_s:.0f} s")
        for failure in result.failures:
            err_console.print(
                f"  {failure.host}: {failure.task}: {failure.message}", highlight=False
            )
        err_console.print(f"last lines of {result.log_path}:", highlight=False)
        err_console.print(log_tail(result.log_path), highlight=False, markup=False)
        return
    console.print(
        f"[bold green]installed[/] in {result.duration_s:.0f} s, "
        f"{result.changed} change(s); log: {result.log_path}"
    )
    for name, url in core.summary_urls(cloud).items():
        console.print(f"  {name:<13} {url}")
    console.print(f"  {'CA cert':<13} {cloud.ca_cert_path}")
    console.print(f"  {core.admin_credentials_hint(cloud)}")
    console.print("Next: [bold]imcloud verify[/], then [bold]imcloud users add NAME[/].")


def _progress_table_final(result: RunResult) -> Table:
    table = Table(title="hosts")
    for column in ("host", "ok", "changed", "failed", "unreachable"):
        table.add_column(column)
    for host in result.hosts:
        table.add_row(
            host.name, str(host.ok), str(host.changed), str(host.failed), str(host.unreachable)
        )
    return table


def _print_step(message: str) -> None:
    err_console.print(f"[dim]{message}[/]")


class _PhaseLines:
    """Progress for logs and pipes: one line each time a host enters a new phase."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __call__(self, state: RunState) -> None:
        with state.lock:
            changes = [
                (h.name, h.phase) for h in state.hosts.values() if self._seen.get(h.name) != h.phase
            ]
        for name, phase in changes:
            self._seen[name] = phase
            err_console.print(f"{name}: {phase}", highlight=False)


@contextlib.contextmanager
def _progress_display() -> Iterator[Callable[[RunState], None]]:
    """A live table on a terminal; one line per host and phase in logs and pipes."""
    if not err_console.is_terminal:
        yield _PhaseLines()
        return
    with Live(console=err_console, refresh_per_second=4, transient=True) as live:
        yield lambda state: live.update(_progress_table(state))


@operator_errors
def install(
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
    tags: Annotated[str | None, typer.Option(help="Only run these role tags.")] = None,
    limit: Annotated[str | None, typer.Option(help="Only these hosts or groups.")] = None,
    skip_check: Annotated[
        bool, typer.Option("--skip-check", help="Do not run the preflight checks first.")
    ] = False,
    json_output: JsonOutput = False,
) -> None:
    """Install or update the cloud on its hosts. Idempotent: run it again at any time."""
    loaded = Cloud.load(cloud)
    options: dict[str, Any] = {"tags": tags, "limit": limit, "preflight": not skip_check}
    if json_output:
        result = core.install(loaded, **options)
        print_json(result.to_dict())
    else:
        with _progress_display() as on_update:
            result = core.install(loaded, on_step=_print_step, on_update=on_update, **options)
        _print_summary(loaded, result)
    if not result.ok:
        raise typer.Exit(code=1)
