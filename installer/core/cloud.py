"""A cloud directory: the operator's config plus what `imcloud init` derives from it.

Layout (docs/architecture.md): ``imcloud.yml``, ``inventory.yml`` (generated),
``secrets.yml`` (ansible-vault), ``.vault-pass``, ``ca/``, ``logs/``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from installer.core import config as cfg
from installer.core import secrets as sec
from installer.errors import ImcloudError

CONFIG_NAME = "imcloud.yml"
INVENTORY_NAME = "inventory.yml"
SECRETS_NAME = "secrets.yml"
VAULT_PASS_NAME = ".vault-pass"
DEFAULT_CLOUD_DIR = Path("cloud")


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    internal_address: str
    user: str
    port: int
    private_key_file: Path | None
    roles: tuple[cfg.Role, ...]
    known_hosts_file: Path | None = None
    strict_host_key_checking: bool = True

    def ssh_options(self) -> list[str]:
        """ssh(1) options shared by every way we reach the host (ssh, Ansible, testinfra)."""
        opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        if not self.strict_host_key_checking:
            opts += ["-o", "StrictHostKeyChecking=no"]
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts_file or os.devnull}"]
        elif self.known_hosts_file is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts_file}"]
        return opts

    def ssh_args(self) -> list[str]:
        """Arguments for ssh(1) up to and including the destination."""
        args = ["-p", str(self.port), *self.ssh_options()]
        if self.private_key_file is not None:
            args += ["-i", str(self.private_key_file), "-o", "IdentitiesOnly=yes"]
        return [*args, f"{self.user}@{self.address}"]


def vrrp_router_id(domain: str) -> int:
    """VRRP virtual router id 1-255, stable per cloud, so two clouds on one network differ."""
    return int(hashlib.sha256(domain.encode()).hexdigest(), 16) % 255 + 1


class Cloud:
    """A loaded, validated cloud directory."""

    def __init__(self, directory: Path, config: cfg.CloudConfig) -> None:
        self.dir = directory
        self.config = config

    @classmethod
    def load(cls, directory: Path) -> Cloud:
        directory = directory.expanduser().resolve()
        if not (directory / CONFIG_NAME).is_file():
            raise ImcloudError(
                f"{directory} is not a cloud directory (no {CONFIG_NAME}): "
                "run `imcloud init` or pass --cloud"
            )
        return cls(directory, cfg.load_config(directory / CONFIG_NAME))

    # -- paths -------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_NAME

    @property
    def inventory_path(self) -> Path:
        return self.dir / INVENTORY_NAME

    @property
    def secrets_path(self) -> Path:
        return self.dir / SECRETS_NAME

    @property
    def vault_password_path(self) -> Path:
        return self.dir / VAULT_PASS_NAME

    @property
    def ca_dir(self) -> Path:
        return self.dir / "ca"

    @property
    def ca_cert_path(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def logs_dir(self) -> Path:
        path = self.dir / "logs"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    # -- hosts -------------------------------------------------------------
    @property
    def hosts(self) -> list[Host]:
        ssh = self.config.ssh
        return [
            Host(
                name=h.name,
                address=h.address,
                internal_address=h.internal,
                user=ssh.user,
                port=ssh.port,
                private_key_file=ssh.private_key_file,
                roles=tuple(self.config.roles_of(h)),
                known_hosts_file=ssh.known_hosts_file,
                strict_host_key_checking=ssh.strict_host_key_checking,
            )
            for h in self.config.hosts
        ]

    def hosts_in(self, role: cfg.Role) -> list[Host]:
        return [h for h in self.hosts if role in h.roles]

    @property
    def public_url(self) -> str:
        return f"https://{self.config.domain}"

    @property
    def tls_trust_anchor(self) -> Path | None:
        """The CA file that must vouch for the public certificate; None: the system's CAs.

        internal: the cloud's CA. acme: the private ACME server's bundle if set, else the
        system's CAs; never the internal CA, which signs what nginx serves until certbot has
        a certificate. provided: the system's CAs.
        """
        tls = self.config.tls
        if tls.mode == "internal":
            return self.ca_cert_path
        if tls.mode == "acme":
            return tls.acme_ca_bundle
        return None

    @property
    def lb_address(self) -> str:
        """Where clients reach nginx: the floating address (ha), else the lb host."""
        return self.config.ha.floating_address or self.hosts_in("lb")[0].address

    def secrets(self) -> dict[str, str]:
        return sec.read_secrets(self.secrets_path, self.vault_password_path)

    # -- derived files -----------------------------------------------------
    def render_inventory(self) -> dict[str, Any]:
        """The Ansible inventory for this config (groups and variables per docs/architecture.md)."""
        conf = self.config
        groups: dict[str, Any] = {role: {"hosts": {}} for role in cfg.ALL_ROLES}
        host_vars: dict[str, Any] = {}
        for host in self.hosts:
            host_vars[host.name] = {
                "ansible_host": host.address,
                "imcloud_internal_address": host.internal_address,
            }
            for role in host.roles:
                groups[role]["hosts"][host.name] = None
        global_vars: dict[str, Any] = {
            "ansible_user": conf.ssh.user,
            "ansible_port": conf.ssh.port,
            "ansible_ssh_common_args": " ".join(self.hosts[0].ssh_options()),
            "imcloud_domain": conf.domain,
            "imcloud_profile": conf.profile,
            "imcloud_tls_mode": conf.tls.mode,
            "imcloud_ca_dir": str(self.ca_dir),
            "imcloud_alert_receivers": conf.alerts.receivers,
        }
        if conf.profile == "ha":
            global_vars["imcloud_floating_address"] = conf.ha.floating_address
            global_vars["imcloud_vrrp_interface"] = conf.ha.interface
            global_vars["imcloud_vrrp_router_id"] = vrrp_router_id(conf.domain)
        if conf.ssh.private_key_file is not None:
            global_vars["ansible_ssh_private_key_file"] = str(conf.ssh.private_key_file)
        if conf.tls.mode == "acme":
            global_vars["imcloud_acme_directory_url"] = conf.tls.acme_directory_url
            global_vars["imcloud_acme_email"] = conf.tls.acme_email
            if conf.tls.acme_ca_bundle is not None:
                global_vars["imcloud_acme_ca_bundle"] = str(conf.tls.acme_ca_bundle)
        if conf.tls.mode == "provided":
            global_vars["imcloud_tls_cert_file"] = str(conf.tls.cert_file)
            global_vars["imcloud_tls_key_file"] = str(conf.tls.key_file)
        return {
            "all": {
                "vars": global_vars,
                "children": {"imcloud": {"hosts": host_vars, "children": groups}},
            }
        }

    def write_derived(self) -> list[str]:
        """Write the inventory, add missing secrets, create the CA. Returns what was created."""
        created: list[str] = []
        inventory = yaml.safe_dump(self.render_inventory(), sort_keys=False)
        header = f"# Generated by imcloud from {CONFIG_NAME}; edit that file, not this one.\n"
        sec.write_private(self.inventory_path, (header + inventory).encode(), mode=0o644)
        new_secrets = sec.ensure_secrets(self.secrets_path, self.vault_password_path)
        if new_secrets:
            created.append(f"{len(new_secrets)} secret(s) in {SECRETS_NAME}")
        if sec.ensure_ca(self.ca_dir, self.config.domain):
            created.append("internal CA in ca/")
        return created


def init_cloud(directory: Path, config: cfg.CloudConfig | None) -> tuple[Cloud, list[str]]:
    """Create or refresh a cloud directory.

    With a config, writes it as ``imcloud.yml`` (refusing to replace a different
    one); without, re-reads the existing ``imcloud.yml``. Either way the derived
    files are brought up to date; existing secrets and the CA are never replaced.
    Everything is validated before the first write.
    """
    directory = directory.expanduser().resolve()
    config_path = directory / CONFIG_NAME
    if config is None:
        cloud = Cloud.load(directory)
        return cloud, cloud.write_derived()
    if config_path.exists():
        existing = cfg.load_config(config_path)
        if existing != config:
            raise ImcloudError(
                f"{config_path} already exists with other settings: edit it and run "
                "`imcloud init` without options, or choose another --cloud directory"
            )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    sec.write_private(config_path, cfg.dump_config(config).encode(), mode=0o600)
    cloud = Cloud(directory, config)
    return cloud, ["imcloud.yml", *cloud.write_derived()]
