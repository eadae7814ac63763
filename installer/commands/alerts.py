"""imcloud alerts (placeholder until its owner lands it)."""

from __future__ import annotations

import typer

from installer.console import operator_errors
from installer.errors import ImcloudError

app = typer.Typer(help="alerts", no_args_is_help=True)


@app.command("placeholder")
@operator_errors
def alerts() -> None:
    """Not built yet."""
    raise ImcloudError("imcloud alerts is not built yet")
