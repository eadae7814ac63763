"""The operator's `imcloud.yml`: a typed, validated model and its loader.

Validation happens before anything is written or changed, and every problem
is reported with the path of the offending field (``hosts[1].address``).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
import yaml
from cryptography import x509
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from installer.core.alerts import validate_receivers
from installer.errors import ImcloudError
from installer.paths import templates_dir

Role = Literal["lb", "app", "db", "cache", "monitoring"]
ALL_ROLES: tuple[Role, ...] = ("lb", "app", "db", "cache", "monitoring")

_HOSTNAME_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"^{_HOSTNAME_LABEL}(\.{_HOSTNAME_LABEL})*$", re.IGNORECASE)
_HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _check_address(value: str) -> str:
    """An IP address or a DNS name; anything else is a typo."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _DNS_NAME.match(value):
        raise ValueError(f"{value!r} is neither an IP address nor a DNS name")
    return value


def _check_pem_bundle(path: Path) -> Path:
    """A readable file of one or more PEM certificates, as an absolute path (Ansible copies it)."""
    path = path.expanduser().resolve()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path} is not a bundle of PEM certificates") from None
    return path


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Model):
    mode: Literal["internal", "acme", "provided"] = "internal"
    acme_directory_url: str | None = None
    acme_email: str | None = None
    acme_ca_bundle: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("acme_directory_url")
    @classmethod
    def _https_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https://[^\s/]+(/\S*)?$", value):
            raise ValueError(f"{value!r} is not an https:// URL")
        return value

    @field_validator("acme_ca_bundle")
    @classmethod
    def _pem_bundle(cls, value: Path | None) -> Path | None:
        return None if value is None else _check_pem_bundle(value)

    @field_validator("acme_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.match(value):
            raise ValueError(f"{value!r} is not an email address")
        return value

    @model_validator(mode="after")
    def _mode_needs(self) -> TlsConfig:
        if self.mode == "acme":
            for field in ("acme_directory_url", "acme_email"):
                if getattr(self, field) is None:
                    raise ValueError(f"{field} is required when mode is acme")
        if self.mode == "provided":
            for field in ("cert_file", "key_file"):
                path = getattr(self, field)
                if path is None:
                    raise ValueError(f"{field} is required when mode is provided")
                if not path.expanduser().is_file():
                    raise ValueError(f"{field}: {path} does not exist")
        return self


class SshConfig(_Model):
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    private_key_file: Path | None = None
    strict_host_key_checking: bool = True
    known_hosts_file: Path | None = None
    # Run Ansible's modules through mitogen (one Python per host for the whole run)
    # rather than shipping each module over its own SSH command; false is the
    # fallback should a host's setup not agree with it.
    mitogen: bool = True

    @field_validator("private_key_file")
    @classmethod
    def _key_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"{value} does not exist")
        return value.expanduser() if value is not None else None


class HostConfig(_Model):
    name: str
    address: str
    internal_address: str | None = None
    roles: list[Role] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HOST_NAME.match(value):
            raise ValueError(f"{value!r} must start with a letter and use only a-z, 0-9 and '-'")
        return value

    @field_validator("address", "internal_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, value: list[Role]) -> list[Role]:
        if len(set(value)) != len(value):
            raise ValueError("a role is listed twice")
        return value

    @property
    def internal(self) -> str:
        return self.internal_address or self.address


class HaConfig(_Model):
    """Settings of the ``ha`` profile."""

    # The address clients reach: keepalived (VRRP) keeps it on one healthy lb host.
    # It must be free and in the subnet of the lb hosts' internal addresses.
    floating_address: str | None = None
    # Network interface of the lb hosts that carries the floating address.
    interface: str = "eth0"

    @field_validator("floating_address")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None


class AlertsConfig(_Model):
    receivers: list[dict[str, Any]] = Field(default_factory=list)


class CloudConfig(_Model):
    domain: Annotated[str, Field(min_length=1, max_length=253)]
    profile: Literal["single", "cluster", "ha"] = "single"
    tls: TlsConfig = Field(default_factory=TlsConfig)
    ha: HaConfig = Field(default_factory=HaConfig)
    ssh: SshConfig = Field(default_factory=SshConfig)
    hosts: list[HostConfig] = Field(min_length=1)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if not _DNS_NAME.match(value) or "." not in value:
            raise ValueError(f"{value!r} is not a fully qualified DNS name")
        return value.lower()

    @model_validator(mode="after")
    def _layout(self) -> CloudConfig:
        names = [h.name for h in self.hosts]
        addresses = [h.address for h in self.hosts]
        for label, values in (("name", names), ("address", addresses)):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"hosts: {label} used twice: {', '.join(dupes)}")
        if self.profile != "ha" and self.ha != HaConfig():
            raise ValueError(f"ha: settings of profile ha, but profile is {self.profile}")
        if self.profile == "single":
            if len(self.hosts) != 1:
                raise ValueError(
                    f"profile single takes exactly one host, got {len(self.hosts)}; "
                    "use profile: cluster"
                )
            return self
        for host in self.hosts:
            if not host.roles:
                raise ValueError(f"hosts: {host.name} has no roles (profile {self.profile})")
        if self.profile == "ha":
            self._check_ha()
            return self
        counts = role_counts(self)
        wanted: dict[Role, tuple[int, int | None]] = {
            "lb": (1, 1),
            "app": (2, None),
            "db": (1, 1),
            "cache": (1, 1),
            "monitoring": (0, 1),
        }
        for role, (low, high) in wanted.items():
            n = counts[role]
            if n < low or (high is not None and n > high):
                want = f"exactly {low}" if low == high else f"at least {low}"
                if high is not None and low != high:
                    want = f"{low} to {high}"
                raise ValueError(f"profile cluster needs {want} host(s) with role {role}, got {n}")
        return self

    def _check_ha(self) -> None:
        problems = survival_problems(self)
        if problems:
            raise ValueError(f"profile ha must survive the loss of any one host: {problems[0]}")
        if role_counts(self)["monitoring"] > 1:
            raise ValueError("profile ha takes at most one host with role monitoring")
        if self.tls.mode == "acme":
            # HTTP-01 reaches only the lb holding the floating address; the other's
            # certbot would fail. Until the lbs share one certificate: internal or provided.
            raise ValueError(
                "profile ha does not support tls.mode acme yet: use internal or provided"
            )
        floating = self.ha.floating_address
        if floating is None:
            raise ValueError("profile ha needs ha.floating_address (kept on a healthy lb host)")
        if floating in {h.address for h in self.hosts} | {h.internal for h in self.hosts}:
            raise ValueError(f"ha.floating_address {floating} is a host's address; pick a free one")

    def roles_of(self, host: HostConfig) -> list[Role]:
        """A single host carries every role; cluster and ha hosts carry what they list."""
        return list(ALL_ROLES) if self.profile == "single" else list(host.roles)


#: How many hosts of a role a cloud needs to keep serving after losing any one host.
#: db and cache need three: etcd and the Sentinels elect by majority.
SURVIVAL_MINIMUM: dict[Role, int] = {"lb": 2, "app": 2, "db": 3, "cache": 3}
_SURVIVAL_WHY: dict[Role, str] = {
    "lb": "the other load balancer takes over the floating address",
    "app": "the load balancer sends clients to the other app nodes",
    "db": "etcd keeps a majority and Patroni promotes a synchronous replica",
    "cache": "the Sentinels keep a majority and promote a replica",
}


def role_counts(config: CloudConfig) -> dict[Role, int]:
    return {role: sum(role in config.roles_of(h) for h in config.hosts) for role in ALL_ROLES}


def survival_problems(
    config: CloudConfig, roles: tuple[Role, ...] = tuple(SURVIVAL_MINIMUM)
) -> list[str]:
    """Why losing one host (of those carrying ``roles``) would stop the cloud; [] if it would not.

    Only the ``ha`` profile has replicated databases and caches: ``single`` and
    ``cluster`` clouds lose their one PostgreSQL and Redis with their host.
    """
    counts = role_counts(config)
    problems = []
    for role in roles:
        need, have = SURVIVAL_MINIMUM[role], counts[role]
        if config.profile != "ha" and role in ("db", "cache"):
            problems.append(
                f"profile {config.profile} has one unreplicated {role} host: "
                "losing it stops the cloud (use profile ha)"
            )
        elif have < need:
            problems.append(
                f"{have} host(s) with role {role}, {need} needed so that, when one is lost, "
                f"{_SURVIVAL_WHY[role]}"
            )
    return problems


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def parse_config(data: Any, source: str = "imcloud.yml") -> CloudConfig:
    """Validate raw YAML data; raise ImcloudError naming the first bad field."""
    if not isinstance(data, dict):
        raise ImcloudError(f"{source}: expected a mapping at the top level")
    try:
        config = CloudConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _field_path(tuple(first["loc"])) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ImcloudError(f"{source}: {where}: {message}{more}") from None
    _validate_receivers(config, source)
    return config


def _validate_receivers(config: CloudConfig, source: str) -> None:
    try:
        validate_receivers(config.alerts.receivers)
    except ImcloudError as exc:
        raise ImcloudError(f"{source}: {exc}") from None


def load_config(path: Path) -> CloudConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ImcloudError(f"{path} not found: run `imcloud init` first") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ImcloudError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
    return parse_config(data, source=str(path))


def dump_config(config: CloudConfig) -> str:
    """imcloud.yml text with a comment on each section (templates/imcloud.yml.j2)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["to_yaml"] = lambda data: yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False
    )
    data = config.model_dump(mode="json", exclude_none=True)
    return env.get_template("imcloud.yml.j2").render(config=data)


def parse_host_option(spec: str) -> dict[str, Any]:
    """``NAME=ADDRESS[,ROLE...]`` from the command line, e.g. ``app1=203.0.113.11,app``."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ImcloudError(f"--host {spec!r}: expected NAME=ADDRESS[,ROLE...]")
    address, *roles = rest.split(",")
    return {"name": name, "address": address, "roles": roles}


def tls_from_options(
    mode: str, acme_directory_url: str | None, acme_email: str | None, acme_ca_bundle: Path | None
) -> dict[str, Any]:
    """The ``tls`` section from `imcloud init` options; options not given are left out."""
    given = {
        "acme_directory_url": acme_directory_url,
        "acme_email": acme_email,
        "acme_ca_bundle": acme_ca_bundle,
    }
    return {"mode": mode, **{key: value for key, value in given.items() if value is not None}}


def receivers_from_options(
    webhooks: list[str], emails: list[str], smarthost: str | None
) -> list[dict[str, Any]]:
    receivers: list[dict[str, Any]] = [
        {"name": f"webhook-{i}", "type": "webhook", "url": url} for i, url in enumerate(webhooks, 1)
    ]
    for i, address in enumerate(emails, 1):
        receiver: dict[str, Any] = {"name": f"email-{i}", "type": "email", "to": address}
        if smarthost:
            receiver["smarthost"] = smarthost
        receivers.append(receiver)
    return receivers
