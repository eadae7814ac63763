"""imcloud lab (placeholder until its owner lands it)."""

from __future__ import annotations

import typer

from installer.console import operator_errors
from installer.errors import ImcloudError

app = typer.Typer(help="lab", no_args_is_help=True)


@app.command("placeholder")
@operator_errors
def lab() -> None:
    """Not built yet."""
    raise ImcloudError("imcloud lab is not built yet")
