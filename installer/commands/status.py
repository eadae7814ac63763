"""imcloud status (placeholder until its owner lands it)."""

from __future__ import annotations

import typer

from installer.console import operator_errors
from installer.errors import ImcloudError

app = typer.Typer(help="status", no_args_is_help=True)


@app.command("placeholder")
@operator_errors
def status() -> None:
    """Not built yet."""
    raise ImcloudError("imcloud status is not built yet")
