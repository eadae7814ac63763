"""imcloud lab: local Debian 12 test hosts (systemd-nspawn containers on a private bridge)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from installer.console import console, err_console, operator_errors, print_json
from installer.core.lab import Lab, LabStatus, list_labs

app = typer.Typer(
    help="Local Debian 12 lab hosts to try and test imcloud on (needs root on Linux).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

NameOption = Annotated[
    str, typer.Option("--name", "-n", envvar="IMCLOUD_LAB", help="Lab name (several can coexist).")
]


class _HostProgress:
    """One spinner line per host, updated from the lab's worker threads."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, node: str, phase: str) -> None:
        if node not in self.tasks:
            self.tasks[node] = self.progress.add_task(node, total=None, phase=phase)
        done = phase.startswith(("ready", "removed"))
        self.progress.update(self.tasks[node], phase=phase, total=1 if done else None,
                             completed=1 if done else 0)


def _print_phase(node: str, phase: str) -> None:
    err_console.print(f"{node}: {phase}", highlight=False)


@contextlib.contextmanager
def _host_progress() -> Iterator[Callable[[str, str], None]]:
    """Live spinners on a terminal; one line per host and phase otherwise (CI logs)."""
    if not err_console.is_terminal:
        yield _print_phase
        return
    with Progress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("[bold]{task.description:<8}"),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
        console=err_console,
    ) as progress:
        yield _HostProgress(progress)


@app.command("up")
@operator_errors
def up(
    nodes: Annotated[int, typer.Option("--nodes", "-N", help="Number of hosts (1-32).")] = 1,
    name: NameOption = "default",
) -> None:
    """Boot the lab's hosts (or reuse them) and write its Ansible inventory."""
    lab = Lab(name)
    started = time.monotonic()
    with _host_progress() as progress:
        hosts = lab.up(nodes, progress=progress)
    console.print(f"lab [bold]{name}[/]: {len(hosts)} host(s) up in "
                  f"{time.monotonic() - started:.1f} s")
    for host in hosts:
        console.print(f"  {host.name:<8} {host.address}")
    console.print(f"inventory: {lab.inventory_path}")
    console.print(f"ssh:       imcloud lab ssh --name {name} {hosts[0].name}")


@app.command("down")
@operator_errors
def down(name: NameOption = "default") -> None:
    """Power off and remove every host, mount, namespace and link of the lab."""
    started = time.monotonic()
    with _host_progress() as progress:
        Lab(name).down(progress=progress)
    console.print(f"lab [bold]{name}[/] removed in {time.monotonic() - started:.1f} s")


@app.command("status")
@operator_errors
def status(
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", envvar="IMCLOUD_LAB", help="One lab (default: all labs)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the labs on this machine and the state of each host."""
    labs = [Lab(name).status()] if name else [Lab(n).status() for n in list_labs()]
    if as_json:
        print_json([s.to_dict() for s in labs])
        return
    if not labs:
        console.print("no labs")
    for lab in labs:
        _print_status(lab)


def _print_status(lab: LabStatus) -> None:
    if not lab.exists:
        console.print(f"lab [bold]{lab.name}[/]: not up")
        return
    table = Table(title=f"lab {lab.name} ({lab.subnet})", title_justify="left")
    for column in ("host", "address", "container", "system"):
        table.add_column(column)
    for node in lab.nodes:
        table.add_row(node.name, node.address, "running" if node.running else "stopped",
                      node.state)
    console.print(table)
    if lab.inventory:
        console.print(f"inventory: {lab.inventory}")


@app.command("ssh", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@operator_errors
def ssh(
    node: Annotated[str, typer.Argument(help="Host name, e.g. node1.")],
    command: Annotated[list[str] | None, typer.Argument(help="Command to run (after --).")] = None,
    name: NameOption = "default",
) -> None:
    """Open a root shell on a lab host, or run a command there: lab ssh node1 -- uname -a."""
    argv = Lab(name).ssh_command(node, *(command or []))
    os.execvp(argv[0], argv)
