"""imcloud init: create or refresh a cloud directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from installer.commands.options import CloudDir
from installer.console import console, operator_errors
from installer.core import config as cfg
from installer.core.cloud import DEFAULT_CLOUD_DIR, init_cloud
from installer.errors import ImcloudError


@operator_errors
def init(
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="Take a written imcloud.yml instead of options.")
    ] = None,
    domain: Annotated[str | None, typer.Option(help="Public DNS name of the cloud.")] = None,
    profile: Annotated[
        str, typer.Option(help="single (one host), cluster, or ha (survives losing a host).")
    ] = "single",
    floating_address: Annotated[
        str | None, typer.Option(help="Profile ha: the address keepalived keeps on a live lb.")
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="NAME=ADDRESS[,ROLE...]; roles: lb app db cache monitoring."),
    ] = None,
    ssh_user: Annotated[str, typer.Option(help="SSH user on the hosts.")] = "root",
    ssh_key: Annotated[Path | None, typer.Option(help="SSH private key file.")] = None,
    tls_mode: Annotated[str, typer.Option(help="internal, acme or provided.")] = "internal",
    acme_directory_url: Annotated[
        str | None, typer.Option(help="ACME directory URL (https://; --tls-mode acme).")
    ] = None,
    acme_email: Annotated[
        str | None, typer.Option(help="ACME account e-mail (--tls-mode acme).")
    ] = None,
    acme_ca_bundle: Annotated[
        Path | None,
        typer.Option(help="PEM CA bundle of a private ACME server (its HTTPS and issued chain)."),
    ] = None,
    webhook: Annotated[
        list[str] | None, typer.Option("--webhook", help="Alert webhook receiver URL (repeatable).")
    ] = None,
    email: Annotated[
        list[str] | None, typer.Option("--email", help="Alert e-mail receiver (repeatable).")
    ] = None,
    smarthost: Annotated[str | None, typer.Option(help="SMTP host:port for e-mail alerts.")] = None,
) -> None:
    """Create a cloud directory: config, inventory, vault-encrypted secrets, an internal CA.

    Run it again without options after editing imcloud.yml: it regenerates the
    inventory and adds what is missing, and never replaces secrets or the CA.
    """
    config: cfg.CloudConfig | None
    if config_file is not None:
        config = cfg.load_config(config_file)
    elif domain is not None:
        data: dict[str, Any] = {
            "domain": domain,
            "profile": profile,
            "tls": cfg.tls_from_options(tls_mode, acme_directory_url, acme_email, acme_ca_bundle),
            **({"ha": {"floating_address": floating_address}} if floating_address else {}),
            "ssh": {"user": ssh_user, **({"private_key_file": str(ssh_key)} if ssh_key else {})},
            "hosts": [cfg.parse_host_option(spec) for spec in host or []],
            "alerts": {
                "receivers": cfg.receivers_from_options(webhook or [], email or [], smarthost)
            },
        }
        config = cfg.parse_config(data, source="options")
    elif (cloud / "imcloud.yml").exists():
        config = None
    else:
        raise ImcloudError("give --domain and --host (or --config FILE) to create a cloud")
    result, created = init_cloud(cloud, config)
    for item in created:
        console.print(f"[green]created[/] {item}")
    console.print(f"Cloud directory ready: [bold]{result.dir}[/] ({len(result.hosts)} host(s))")
    console.print("Next: [bold]imcloud check[/], then [bold]imcloud install[/].")
