"""Shared Rich consoles: stdout for results, stderr for errors and progress."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from installer.errors import ImcloudError

P = ParamSpec("P")
R = TypeVar("R")

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Print one JSON document on stdout, plain (no Rich markup) so scripts can parse it."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def operator_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn an ImcloudError raised by a command into one error line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ImcloudError as exc:
            error(str(exc))
            raise typer.Exit(code=1) from None

    return wrapper
