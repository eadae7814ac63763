"""imcloud users: add, list, disable, enable and delete IM users through the admin API."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from installer.commands.options import CloudDir, JsonOutput
from installer.console import console, operator_errors, print_json
from installer.core import users as core
from installer.core.cloud import DEFAULT_CLOUD_DIR, Cloud

app = typer.Typer(
    help="Add, list, disable, enable and delete users of the IM cloud (through its admin API).",
    no_args_is_help=True,
)

Name = Annotated[str, typer.Argument(help="User name: letters, digits, '.', '_', '-'.")]


@app.command("add")
@operator_errors
def add(
    name: Name,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read the password from stdin (first line) instead of generating one.",
        ),
    ] = False,
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
    json_output: JsonOutput = False,
) -> None:
    """Create a user. Without --password-stdin a random password is generated and shown once."""
    core.check_username(name)
    if password_stdin:
        password = core.check_password(sys.stdin.readline().rstrip("\r\n"))
    else:
        password = core.generate_password()
    created = core.add_user(Cloud.load(cloud), name, password)
    if json_output:
        print_json({**created, **({} if password_stdin else {"password": password})})
        return
    console.print(f"created user [bold]{created['username']}[/] (id {created['id']})")
    if not password_stdin:
        console.print(f"password (shown once): {password}", highlight=False, markup=False)


@app.command("list")
@operator_errors
def list_(cloud: CloudDir = DEFAULT_CLOUD_DIR, json_output: JsonOutput = False) -> None:
    """List every user with id, state and creation time."""
    users = core.list_users(Cloud.load(cloud))
    if json_output:
        print_json(users)
        return
    table = Table(title=f"{len(users)} user(s)")
    for column in ("id", "username", "state", "created"):
        table.add_column(column)
    for user in users:
        state = "[red]disabled[/]" if user["disabled"] else "active"
        table.add_row(str(user["id"]), user["username"], state, user["created_at"])
    console.print(table)


@app.command("disable")
@operator_errors
def disable(name: Name, cloud: CloudDir = DEFAULT_CLOUD_DIR) -> None:
    """Disable a user: revoke their tokens and disconnect their devices."""
    result = core.disable_user(Cloud.load(cloud), name)
    console.print(
        f"disabled user [bold]{name}[/] (id {result['id']}), "
        f"{result['revoked_devices']} device(s) signed out"
    )


@app.command("enable")
@operator_errors
def enable(name: Name, cloud: CloudDir = DEFAULT_CLOUD_DIR) -> None:
    """Re-enable a disabled user. They log in again: their old devices stay signed out."""
    result = core.enable_user(Cloud.load(cloud), name)
    console.print(f"enabled user [bold]{name}[/] (id {result['id']})")


@app.command("delete")
@operator_errors
def delete(
    name: Name,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
) -> None:
    """Delete a user: revoke their tokens, disconnect their devices, free the name.

    Messages they sent stay in their conversations. This cannot be undone.
    """
    core.check_username(name)
    if not yes:
        typer.confirm(f"Delete user {name} for good?", abort=True)
    result = core.delete_user(Cloud.load(cloud), name)
    console.print(
        f"deleted user [bold]{name}[/] (id {result['id']}), "
        f"{result['revoked_devices']} device(s) signed out"
    )
