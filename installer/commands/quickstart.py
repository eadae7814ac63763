"""imcloud quickstart: lab up, init, check, install, verify — then how to connect."""

from __future__ import annotations

from typing import Annotated

import typer

from installer.commands import check, install, lab, verify
from installer.commands.options import CloudDir
from installer.console import console, err_console, operator_errors
from installer.core import config as cfg
from installer.core.cloud import DEFAULT_CLOUD_DIR, init_cloud
from installer.core.lab import Lab
from installer.core.quickstart import lab_cloud_config
from installer.errors import ImcloudError


@operator_errors
def quickstart(
    nodes: Annotated[
        int, typer.Option("--nodes", "-N", help="Lab hosts: 1 = single, 3+ = cluster.")
    ] = 3,
    profile: Annotated[
        str | None,
        typer.Option(help="ha: every host app+db+cache, two lbs (3+ nodes); default by size."),
    ] = None,
    lab_name: Annotated[str, typer.Option("--lab", help="Lab name.")] = "quickstart",
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
) -> None:
    """Boot local Debian 12 lab hosts and install a verified IM cloud on them, in one command."""
    err_console.rule("1/5 lab hosts")
    lab.up(nodes=nodes, name=lab_name)
    hosts = Lab(lab_name).hosts()
    err_console.rule("2/5 cloud directory")
    try:
        data = lab_cloud_config(hosts, profile=profile)
    except ValueError as exc:
        raise ImcloudError(f"--profile {profile}: {exc}") from None
    config = cfg.parse_config(data, source="quickstart")
    loaded, created = init_cloud(cloud, config)
    console.print(f"cloud directory {loaded.dir} ({', '.join(created) or 'up to date'})")
    err_console.rule("3/5 preflight")
    check.check(cloud=loaded.dir)
    err_console.rule("4/5 install")
    install.install(cloud=loaded.dir)
    err_console.rule("5/5 verify")
    verify.verify(cloud=loaded.dir)
    lb = loaded.lb_address
    console.print()
    console.print(f"[bold green]Your IM cloud is up[/] at {loaded.public_url} on lab '{lab_name}'.")
    console.print(f"  resolve the name: echo '{lb} {loaded.config.domain}' >> /etc/hosts")
    console.print(f"  trust its CA:     {loaded.ca_cert_path}")
    console.print(f"  add a user:       imcloud users add alice --cloud {loaded.dir}")
    console.print(f"  health:           imcloud status --cloud {loaded.dir}")
    console.print(f"  a shell on a host: imcloud lab ssh --name {lab_name} {hosts[0].name}")
    console.print(f"  remove it all:    imcloud lab down --name {lab_name}")
