"""imcloud install (placeholder until its owner lands it)."""

from __future__ import annotations

import typer

from installer.console import operator_errors
from installer.errors import ImcloudError

app = typer.Typer(help="install", no_args_is_help=True)


@app.command("placeholder")
@operator_errors
def install() -> None:
    """Not built yet."""
    raise ImcloudError("imcloud install is not built yet")
