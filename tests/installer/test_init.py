"""`imcloud init` and the cloud directory: validation first, nothing half-written."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from typer.testing import CliRunner

from installer.cli import app
from installer.core.cloud import Cloud, init_cloud
from installer.core.config import parse_config
from installer.core.secrets import SECRET_NAMES, ensure_ca
from installer.errors import ImcloudError

runner = CliRunner()

CLUSTER = {
    "domain": "chat.example.com",
    "profile": "cluster",
    "hosts": [
        {"name": "lb1", "address": "192.0.2.10", "roles": ["lb", "monitoring"]},
        {"name": "app1", "address": "192.0.2.11", "roles": ["app", "db", "cache"]},
        {
            "name": "app2",
            "address": "192.0.2.12",
            "internal_address": "10.1.0.12",
            "roles": ["app"],
        },
    ],
    "alerts": {
        "receivers": [{"name": "hook", "type": "webhook", "url": "https://hooks.example.com/a"}]
    },
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_config_inventory_secrets_and_ca(tmp_path: Path) -> None:
    cloud, created = init_cloud(tmp_path / "c", parse_config(CLUSTER))
    assert "imcloud.yml" in created
    secrets = cloud.secrets()
    assert set(secrets) == set(SECRET_NAMES)
    assert len(set(secrets.values())) == len(SECRET_NAMES), "every secret is distinct"
    assert b"$ANSIBLE_VAULT" in cloud.secrets_path.read_bytes()[:20]
    for private in (cloud.secrets_path, cloud.vault_password_path, cloud.ca_dir / "ca.key"):
        assert _mode(private) == 0o600, private
    ca = x509.load_pem_x509_certificate(cloud.ca_cert_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    inventory = yaml.safe_load(cloud.inventory_path.read_text())
    imcloud = inventory["all"]["children"]["imcloud"]
    assert set(imcloud["children"]["app"]["hosts"]) == {"app1", "app2"}
    assert set(imcloud["children"]["monitoring"]["hosts"]) == {"lb1"}
    assert imcloud["hosts"]["app2"]["imcloud_internal_address"] == "10.1.0.12"
    assert imcloud["hosts"]["app1"]["imcloud_internal_address"] == "192.0.2.11"
    assert inventory["all"]["vars"]["imcloud_domain"] == "chat.example.com"


def test_rerun_keeps_secrets_and_ca(tmp_path: Path) -> None:
    cloud, _ = init_cloud(tmp_path, parse_config(CLUSTER))
    before = (cloud.secrets(), cloud.ca_cert_path.read_bytes())
    again, created = init_cloud(tmp_path, None)
    assert created == []
    assert (again.secrets(), again.ca_cert_path.read_bytes()) == before


def test_single_profile_host_carries_every_role(tmp_path: Path) -> None:
    cloud, _ = init_cloud(
        tmp_path,
        parse_config(
            {"domain": "im.example.org", "hosts": [{"name": "one", "address": "192.0.2.5"}]}
        ),
    )
    assert cloud.hosts[0].roles == ("lb", "app", "db", "cache", "monitoring")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"domain": "not a domain"}, "domain"),
        ({"profile": "huge"}, "profile"),
        (
            {"hosts": [{"name": "lb1", "address": "999.1.1.1!", "roles": ["lb"]}]},
            "hosts[0].address",
        ),
        ({"hosts": CLUSTER["hosts"][:2]}, "needs at least 2 host(s) with role app"),
        ({"tls": {"mode": "acme"}}, "tls: Value error, acme_directory_url is required"),
        ({"colour": "blue"}, "colour"),
        (
            {"alerts": {"receivers": [{"name": "x", "type": "webhook", "url": "ftp:/nope"}]}},
            "receivers[0].url",
        ),
    ],
)
def test_invalid_config_names_the_field_and_writes_nothing(
    tmp_path: Path, change: dict[str, object], field: str
) -> None:
    with pytest.raises(ImcloudError) as excinfo:
        parse_config({**CLUSTER, **change})
    assert field.removeprefix("tls: Value error, ") in str(excinfo.value)

    config_file = tmp_path / "bad.yml"
    config_file.write_text(yaml.safe_dump({**CLUSTER, **change}))
    result = runner.invoke(
        app, ["init", "--cloud", str(tmp_path / "c"), "--config", str(config_file)]
    )
    assert result.exit_code == 1, result.output
    assert "error:" in result.output
    assert not (tmp_path / "c").exists()


def test_init_from_options_and_refusal_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "c"
    args = [
        "init",
        "--cloud",
        str(target),
        "--domain",
        "chat.example.com",
        "--host",
        "solo=192.0.2.7",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Cloud.load(target).hosts[0].address == "192.0.2.7"
    assert "# single: one host carries every role." in (target / "imcloud.yml").read_text()

    result = runner.invoke(app, [*args[:-1], "other=192.0.2.8"])
    assert result.exit_code == 1
    assert "already exists with other settings" in result.output
    assert Cloud.load(target).hosts[0].name == "solo"


def test_commands_refuse_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ImcloudError, match="not a cloud directory"):
        Cloud.load(tmp_path)


def _acme_bundle(tmp_path: Path) -> Path:
    """A PEM certificate file (a freshly made CA) to serve as a private ACME server's bundle."""
    ensure_ca(tmp_path / "acme-ca", "acme.example.test")
    return tmp_path / "acme-ca" / "ca.crt"


ACME = {"mode": "acme", "acme_directory_url": "https://acme.example/dir", "acme_email": "o@x.io"}


@pytest.mark.parametrize(
    ("tls", "field", "message"),
    [
        ({**ACME, "acme_email": None}, "tls", "acme_email is required when mode is acme"),
        ({**ACME, "acme_email": "nobody"}, "tls.acme_email", "is not an email address"),
        (
            {**ACME, "acme_directory_url": "http://acme.example/dir"},
            "tls.acme_directory_url",
            "is not an https:// URL",
        ),
        (
            {**ACME, "acme_directory_url": "https://acme example/dir"},
            "tls.acme_directory_url",
            "is not an https:// URL",
        ),
        ({**ACME, "acme_ca_bundle": "/nonexistent/ca.pem"}, "tls.acme_ca_bundle", "No such file"),
        ({**ACME, "acme_ca_bundle": __file__}, "tls.acme_ca_bundle", "not a bundle of PEM"),
    ],
)
def test_bad_acme_settings_are_refused_naming_the_field(
    tmp_path: Path, tls: dict[str, object], field: str, message: str
) -> None:
    data = {**CLUSTER, "tls": {k: v for k, v in tls.items() if v is not None}}
    with pytest.raises(ImcloudError, match=rf"imcloud.yml: {re.escape(field)}: .*{message}"):
        parse_config(data)


def test_acme_options_reach_the_inventory(tmp_path: Path) -> None:
    bundle = _acme_bundle(tmp_path)
    target = tmp_path / "c"
    args = [
        "init",
        "--cloud",
        str(target),
        "--domain",
        "chat.example.com",
        "--host",
        "solo=192.0.2.7",
    ]
    acme = ["--tls-mode", "acme", "--acme-directory-url", "https://acme.example/dir"]
    acme += ["--acme-email", "ops@example.com", "--acme-ca-bundle", str(bundle)]
    result = runner.invoke(app, [*args, *acme])
    assert result.exit_code == 0, result.output

    tls = Cloud.load(target).config.tls
    assert (tls.acme_directory_url, tls.acme_ca_bundle) == ("https://acme.example/dir", bundle)
    assert "acme_ca_bundle: optional PEM file" in (target / "imcloud.yml").read_text()
    variables = yaml.safe_load((target / "inventory.yml").read_text())["all"]["vars"]
    assert variables["imcloud_acme_directory_url"] == "https://acme.example/dir"
    assert variables["imcloud_acme_email"] == "ops@example.com"
    assert variables["imcloud_acme_ca_bundle"] == str(bundle)


def test_acme_option_without_email_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "c"
    args = [
        "init",
        "--cloud",
        str(target),
        "--domain",
        "chat.example.com",
        "--host",
        "solo=192.0.2.7",
    ]
    result = runner.invoke(
        app, [*args, "--tls-mode", "acme", "--acme-directory-url", "https://acme.example/dir"]
    )
    assert result.exit_code == 1
    assert "options: tls: acme_email is required when mode is acme" in result.output
    assert not target.exists()
