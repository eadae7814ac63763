"""imcloud check (placeholder until its owner lands it)."""

from __future__ import annotations

import typer

from installer.console import operator_errors
from installer.errors import ImcloudError

app = typer.Typer(help="check", no_args_is_help=True)


@app.command("placeholder")
@operator_errors
def check() -> None:
    """Not built yet."""
    raise ImcloudError("imcloud check is not built yet")
