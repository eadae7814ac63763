"""Random secrets kept in an ansible-vault file, and the cloud's internal CA."""

from __future__ import annotations

import datetime as dt
import os
import secrets as pysecrets
from pathlib import Path

import yaml
from ansible.constants import DEFAULT_VAULT_ID_MATCH
from ansible.parsing.vault import AnsibleVaultError, VaultLib, VaultSecret
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from installer.errors import ImcloudError

#: Every secret the roles and the IM server use (docs/architecture.md, "Secrets").
SECRET_NAMES: tuple[str, ...] = (
    "imcloud_postgres_password",
    "imcloud_redis_password",
    "imcloud_redis_monitor_password",
    "imcloud_postgres_monitor_password",
    "imcloud_admin_token",
    "imcloud_token_secret",
    "imcloud_monitoring_password",
    # profile ha: Patroni's PostgreSQL superuser and replication roles, its REST
    # API, Redis replication, the Sentinels, keepalived's VRRP authentication.
    "imcloud_postgres_superuser_password",
    "imcloud_postgres_replication_password",
    "imcloud_patroni_api_password",
    "imcloud_redis_replication_password",
    "imcloud_redis_sentinel_password",
    "imcloud_vrrp_password",
)

CA_VALIDITY = dt.timedelta(days=3650)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file that only its owner may read, atomically, never world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    tmp.replace(path)


def _vault(password_file: Path) -> VaultLib:
    password = password_file.read_bytes().strip()
    return VaultLib([(DEFAULT_VAULT_ID_MATCH, VaultSecret(password))])


def ensure_secrets(secrets_file: Path, password_file: Path) -> list[str]:
    """Create the vault password and any missing secret; never change an existing one.

    Returns the names of the secrets it generated.
    """
    if not password_file.exists():
        write_private(password_file, pysecrets.token_urlsafe(48).encode() + b"\n")
    current = read_secrets(secrets_file, password_file) if secrets_file.exists() else {}
    missing = [name for name in SECRET_NAMES if not current.get(name)]
    if missing:
        current.update({name: pysecrets.token_urlsafe(32) for name in missing})
        plaintext = yaml.safe_dump(current, sort_keys=True).encode()
        write_private(secrets_file, _vault(password_file).encrypt(plaintext))
    return missing


def read_secrets(secrets_file: Path, password_file: Path) -> dict[str, str]:
    try:
        plaintext = _vault(password_file).decrypt(secrets_file.read_bytes())
    except FileNotFoundError as exc:
        raise ImcloudError(f"{exc.filename} is missing: run `imcloud init` again") from None
    except AnsibleVaultError:
        raise ImcloudError(
            f"{secrets_file} cannot be decrypted with {password_file}: "
            "the two do not belong together"
        ) from None
    data = yaml.safe_load(plaintext)
    if not isinstance(data, dict):
        raise ImcloudError(f"{secrets_file} does not hold a mapping of secrets")
    return {str(k): str(v) for k, v in data.items()}


def ensure_ca(ca_dir: Path, domain: str) -> bool:
    """Create the internal CA (ECDSA P-256, ten years) unless it exists. Returns True if created."""
    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        return False
    if cert_path.exists() or key_path.exists():
        raise ImcloudError(
            f"{ca_dir} holds only half of a CA (ca.crt or ca.key): restore the other"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imcloud"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"imcloud internal CA for {domain}"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return True
