"""The `imcloud` command: composes one Typer app per command module, nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from installer import __version__
from installer.commands import (
    alerts,
    check,
    drill,
    init,
    install,
    lab,
    quickstart,
    status,
    users,
    verify,
)

app = typer.Typer(
    name="imcloud",
    help="One command to a self-hosted private IM cloud on Debian 12 hosts.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(lab.app, name="lab")
app.add_typer(users.app, name="users")
app.add_typer(alerts.app, name="alerts")
app.add_typer(drill.app, name="drill")
app.command("init")(init.init)
app.command("check")(check.check)
app.command("install")(install.install)
app.command("verify")(verify.verify)
app.command("status")(status.status)
app.command("quickstart")(quickstart.quickstart)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"imcloud {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """One command to a self-hosted private IM cloud on Debian 12 hosts."""


def main() -> None:
    app()
