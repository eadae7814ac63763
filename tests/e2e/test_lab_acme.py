"""TLS mode acme end to end on one lab host (profile single), against Debian's pebble.

pebble (an ACME test server) runs on the controller at the lab's gateway
address, the only address the lab host can reach. It has PEBBLE_VA_ALWAYS_VALID
set, since the lab's domain has no DNS: orders are granted without an HTTP-01
request to the host. Its HTTPS certificate comes from a throwaway CA made here;
that CA and pebble's issuing root form the cloud's ``tls.acme_ca_bundle``
(certbot trusts the first for the directory, verify the second for nginx).

The tests run in file order and share the lab, pebble and the cloud directory;
the lab is removed and pebble stopped at the end, also when a test fails.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shlex
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from installer.cli import app
from installer.core.cloud import Cloud, init_cloud
from installer.core.config import parse_config
from installer.core.install import install
from installer.core.lab import Lab
from installer.core.quickstart import lab_cloud_config
from installer.core.runner import RunResult, log_tail
from installer.core.verify import run_verify

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

LAB_NAME = "acme"
NODES = 1
PEBBLE = "/usr/bin/pebble"
PEBBLE_PORT, PEBBLE_MANAGEMENT_PORT = 14000, 15000
PEBBLE_ENV = {
    "PEBBLE_VA_ALWAYS_VALID": "1",  # no DNS for the lab domain: grant orders unchecked
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce answers: the run is deterministic
}
ACME_EMAIL = "ops@imcloud.test"

Ssh = Callable[[str, str], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class Pebble:
    directory_url: str
    bundle: Path  # pebble's HTTPS CA + its issuing root: the cloud's tls.acme_ca_bundle
    intermediate: x509.Certificate  # issues the certificates
    log: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _https_identity(address: str, workdir: Path) -> tuple[Path, Path, bytes]:
    """A throwaway CA and a certificate for `address` signed by it: (cert, key, CA PEM)."""
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def build(subject: str, public: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name("imcloud acme test CA"))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )

    ca = (
        build("imcloud acme test CA", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))])
    cert = build("pebble", key.public_key()).add_extension(san, critical=False)
    cert_path, key_path = workdir / "pebble.crt", workdir / "pebble.key"
    cert_path.write_bytes(
        cert.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, ca.public_bytes(serialization.Encoding.PEM)


def _fetch(url: str, context: ssl.SSLContext, timeout: float = 15) -> bytes:
    """GET `url`, retrying while pebble starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@contextmanager
def running_pebble(address: str, workdir: Path) -> Iterator[Pebble]:
    cert, key, ca_pem = _https_identity(address, workdir)
    config = workdir / "pebble-config.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"{address}:{PEBBLE_PORT}",
                    "managementListenAddress": f"{address}:{PEBBLE_MANAGEMENT_PORT}",
                    "certificate": str(cert),
                    "privateKey": str(key),
                    "httpPort": 80,
                    "tlsPort": 443,
                }
            }
        )
    )
    log = workdir / "pebble.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PEBBLE, "-config", str(config)],
            env={**os.environ, **PEBBLE_ENV},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        trust = ssl.create_default_context(cadata=ca_pem.decode())
        management = f"https://{address}:{PEBBLE_MANAGEMENT_PORT}"
        root = _fetch(f"{management}/roots/0", trust)
        intermediate = x509.load_pem_x509_certificate(
            _fetch(f"{management}/intermediates/0", trust)
        )
        bundle = workdir / "acme-ca-bundle.pem"
        bundle.write_bytes(ca_pem + root)
        yield Pebble(f"https://{address}:{PEBBLE_PORT}/dir", bundle, intermediate, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def pebble(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    with running_pebble(lab.controller_address(), tmp_path_factory.mktemp("pebble")) as server:
        yield server


def acme_config(lab: Lab, pebble: Pebble, **tls: Any) -> dict[str, Any]:
    """imcloud.yml data: the lab host, profile single, TLS from pebble (`tls` overrides)."""
    data = lab_cloud_config(lab.hosts())
    assert data["profile"] == "single"
    settings = {
        "mode": "acme",
        "acme_directory_url": pebble.directory_url,
        "acme_email": ACME_EMAIL,
        "acme_ca_bundle": str(pebble.bundle),
        **tls,
    }
    data["tls"] = {key: value for key, value in settings.items() if value is not None}
    return data


@pytest.fixture(scope="module")
def cloud(lab: Lab, pebble: Pebble, tmp_path_factory: pytest.TempPathFactory) -> Cloud:
    cloud, _ = init_cloud(tmp_path_factory.mktemp("cloud"), parse_config(acme_config(lab, pebble)))
    return cloud


def served_certificate(cloud: Cloud) -> x509.Certificate:
    """The certificate nginx presents for the domain (read, not verified)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((cloud.lb_address, 443), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=cloud.config.domain) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der, "nginx presented no certificate"
    return x509.load_der_x509_certificate(der)


def acme_files(ssh: Ssh, cloud: Cloud) -> list[str]:
    """What certbot keeps for the domain: one set of files per certificate it obtained."""
    proc = ssh(cloud.hosts[0].name, f"ls /etc/letsencrypt/archive/{cloud.config.domain}")
    assert proc.returncode == 0, proc.stderr
    return sorted(proc.stdout.split())


@pytest.mark.parametrize(
    ("tls", "field"),
    [
        ({"acme_email": None}, "tls: acme_email is required when mode is acme"),
        ({"acme_directory_url": "https//pebble:14000/dir"}, "tls.acme_directory_url: "),
    ],
    ids=["no-email", "malformed-url"],
)
def test_init_refuses_bad_acme_settings_before_any_change(
    lab: Lab, pebble: Pebble, tmp_path: Path, tls: dict[str, Any], field: str
) -> None:
    config_file = tmp_path / "imcloud.yml"
    config_file.write_text(yaml.safe_dump(acme_config(lab, pebble, **tls)))
    target = tmp_path / "cloud"
    result = CliRunner().invoke(app, ["init", "--cloud", str(target), "--config", str(config_file)])
    assert result.exit_code == 1, result.output
    assert field in result.output
    assert not target.exists()


def test_install_obtains_the_certificate_from_pebble(
    cloud: Cloud, explain: Callable[[RunResult], str]
) -> None:
    result = install(cloud)
    print(f"first install: {result.duration_s:.0f} s, phases {result.to_dict()['phases']}")
    assert result.ok, explain(result)
    assert result.changed > 0


def test_nginx_serves_the_certificate_pebble_issued(cloud: Cloud, pebble: Pebble) -> None:
    cert = served_certificate(cloud)
    internal_ca = x509.load_pem_x509_certificate(cloud.ca_cert_path.read_bytes())
    assert cert.issuer != internal_ca.subject, "nginx still serves the internal certificate"
    assert cert.issuer == pebble.intermediate.subject, cert.issuer.rfc4514_string()
    cert.verify_directly_issued_by(pebble.intermediate)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [cloud.config.domain]


def test_second_install_changes_nothing_and_requests_no_certificate(
    cloud: Cloud, ssh: Ssh, explain: Callable[[RunResult], str]
) -> None:
    before = (served_certificate(cloud).serial_number, acme_files(ssh, cloud))
    result = install(cloud)
    print(f"second install: {result.duration_s:.0f} s")
    assert result.ok, explain(result)
    assert result.changes == [], f"not idempotent: {result.changes}"
    assert (served_certificate(cloud).serial_number, acme_files(ssh, cloud)) == before
    assert before[1] == ["cert1.pem", "chain1.pem", "fullchain1.pem", "privkey1.pem"]


def test_certbot_renews_from_pebble_and_reloads_nginx(
    cloud: Cloud, pebble: Pebble, ssh: Ssh
) -> None:
    node, domain = cloud.hosts[0].name, cloud.config.domain
    timer = ssh(node, "systemctl is-enabled certbot.timer && systemctl is-active certbot.timer")
    assert timer.stdout.split() == ["enabled", "active"], timer.stdout + timer.stderr

    renewal = ssh(node, f"cat /etc/letsencrypt/renewal/{domain}.conf")
    settings = {
        key.strip(): value.strip()
        for key, _, value in (line.partition("=") for line in renewal.stdout.splitlines())
    }
    assert settings.get("server") == pebble.directory_url, renewal.stdout
    assert settings.get("renew_hook") == "systemctl reload nginx", renewal.stdout

    # What certbot.timer runs (certbot.service), with that unit's environment: a dry run
    # asks pebble for a certificate but keeps none. (--dry-run alone would go to Let's
    # Encrypt's staging server; an explicit --server keeps it on pebble.)
    environment = ssh(node, "systemctl show --property=Environment --value certbot.service")
    assert "REQUESTS_CA_BUNDLE=" in environment.stdout, environment.stdout
    dry_run = ssh(
        node,
        f"env {shlex.quote(environment.stdout.strip())} certbot renew --dry-run --non-interactive "
        f"--no-random-sleep-on-renew --server {shlex.quote(pebble.directory_url)}",
    )
    assert dry_run.returncode == 0, (
        dry_run.stdout + dry_run.stderr + "\n--- pebble:\n" + log_tail(pebble.log, 30)
    )


def test_verify_passes_with_pebble_as_the_trust_anchor(cloud: Cloud) -> None:
    report = run_verify(cloud)
    assert report.ok, "\n".join(report.failure_lines()) + "\n" + log_tail(report.log_path, 60)
    assert any(r.area == "tls" and r.outcome == "passed" for r in report.results)
