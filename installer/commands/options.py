"""Option types shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

CloudDir = Annotated[
    Path,
    typer.Option("--cloud", envvar="IMCLOUD_DIR", help="Cloud directory (from `imcloud init`)."),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
