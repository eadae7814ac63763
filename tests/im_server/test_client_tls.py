"""The client reaches a node through a TLS terminator by IP address, verifying the
certificate for the cloud's domain name with the cloud's CA (what `imcloud verify` does)."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from im_helpers import unique

from im_server.client import AdminClient, Client, ImError
from im_server.localstack import ServerProcess, Stack

DOMAIN = "chat.imcloud.test"


Key = ec.EllipticCurvePrivateKey


def _cert(subject: str, issuer_key: Key | None, issuer: x509.Name | None, *,
          ca: bool) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]),
                                        critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


@pytest.fixture
async def tls_front(server: ServerProcess, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A TLS terminator on 127.0.0.1 in front of the plain node, like nginx on the lb."""
    ca_cert, ca_key = _cert("imcloud test CA", None, None, ca=True)
    leaf, leaf_key = _cert(DOMAIN, ca_key, ca_cert.subject, ca=False)
    ca_file, cert_file, key_file = tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    front = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = front.sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}", ca_file
    front.close()


async def test_client_over_tls_by_ip_with_domain_name(
        stack: Stack, tls_front: tuple[str, Path]) -> None:
    url, ca_file = tls_front
    ctx = ssl.create_default_context(cafile=str(ca_file))
    tls = {"ssl_context": ctx, "server_hostname": DOMAIN}
    names = [unique("tls"), unique("tls")]
    async with AdminClient(url, stack.admin_token, **tls) as admin:
        ids = [(await admin.create_user(n, "password123"))["id"] for n in names]
        assert set(names) <= {u["username"] for u in await admin.list_users()}
    alice = await Client.login(url, names[0], "password123", **tls)
    bob = await Client.login(url, names[1], "password123", **tls)
    await alice.connect()
    await bob.connect()
    ack = await alice.send(await alice.direct(ids[1]), {"text": "over wss"})
    msg = await bob.next_message()
    assert (msg.seq, msg.body) == (ack.seq, {"text": "over wss"})
    await alice.close()
    await bob.close()
    # the certificate is for the domain, not for the IP: without server_hostname it fails
    with pytest.raises((ImError, OSError)):
        await Client.login(url, names[0], "password123", ssl_context=ctx)
