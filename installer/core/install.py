"""`imcloud install`: refresh derived files, build the IM server wheels, run site.yml."""

from __future__ import annotations

from collections.abc import Callable

from installer.core.cloud import Cloud
from installer.core.preflight import check_cloud
from installer.core.runner import RunResult, RunState, run_playbook
from installer.core.wheels import build_wheels
from installer.errors import ImcloudError


def install(
    cloud: Cloud,
    *,
    on_update: Callable[[RunState], None] | None = None,
    on_step: Callable[[str], None] | None = None,
    tags: str | None = None,
    limit: str | None = None,
    preflight: bool = True,
) -> RunResult:
    """Bring every host of the cloud to the state its config describes. Safe to re-run."""

    def step(message: str) -> None:
        if on_step is not None:
            on_step(message)

    step("refreshing inventory and secrets")
    cloud.write_derived()
    if preflight:
        step("preflight checks")
        report = check_cloud(cloud)
        if not report.ok:
            raise ImcloudError(
                "preflight failed, nothing changed: " + "; ".join(report.failure_lines())
            )
    step("building IM server wheels")
    release = build_wheels(cloud.dir / "wheels")
    step(f"running site.yml (release {release.id})")
    return run_playbook(
        cloud,
        "site.yml",
        log_name="install",
        extra_vars={"imcloud_wheel_dir": str(release.wheel_dir), "imcloud_release": release.id},
        tags=tags,
        limit=limit,
        on_update=on_update,
    )


def admin_credentials_hint(cloud: Cloud) -> str:
    return (
        f"admin token and other secrets: ansible-vault view {cloud.secrets_path} "
        f"--vault-password-file {cloud.vault_password_path}"
    )


def summary_urls(cloud: Cloud) -> dict[str, str]:
    urls = {"web": cloud.public_url, "websocket": f"wss://{cloud.config.domain}/ws"}
    if cloud.hosts_in("monitoring"):
        urls["prometheus"] = f"{cloud.public_url}/prometheus/"
        urls["alertmanager"] = f"{cloud.public_url}/alertmanager/"
    return urls
