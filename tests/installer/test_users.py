"""`imcloud users` and verify's message check against real IM servers behind real TLS.

A throwaway PostgreSQL + Redis + two IM server processes (im_server.localstack) sit
behind a small TLS front on ``<127.x.y.z>:443`` that presents a certificate for the
cloud's domain issued by the cloud's own CA and alternates connections between the
two servers, standing in for nginx. The cloud directory points its load balancer at
that address, so the commands take exactly the path they take against a real cloud.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import random
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from im_server.localstack import PG_BIN, Stack
from installer.cli import app
from installer.core import users, verify
from installer.core.cloud import Cloud, init_cloud
from installer.core.config import parse_config
from installer.errors import ImcloudError

if not (PG_BIN / "postgres").exists():
    pytest.skip(f"PostgreSQL 15 binaries not found in {PG_BIN}", allow_module_level=True)

DOMAIN = "chat.example.com"
#: Cheap argon2: login speed is not what these tests check.
FAST = {"IM_ARGON2_TIME_COST": "1", "IM_ARGON2_MEMORY_KIB": "1024", "IM_LOG_LEVEL": "WARNING"}

runner = CliRunner()


def _issue_cert(cloud: Cloud, directory: Path) -> tuple[Path, Path]:
    """A server certificate for the domain, signed by the cloud's CA."""
    ca_cert = x509.load_pem_x509_certificate(cloud.ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key((cloud.ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = directory / "front.crt", directory / "front.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class TlsFront:
    """TLS on ``address:443``, each connection piped to the next backend in turn."""

    def __init__(self, address: str, backends: list[int], cert: Path, key: Path) -> None:
        self.address = address
        self._next = itertools.cycle(backends)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TlsFront:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            server = await asyncio.start_server(self._handle, self.address, 443, ssl=self._context)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", next(self._next))
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture(scope="module")
def cloud_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """A cluster cloud directory whose load balancer is the TLS front over two IM servers."""
    tmp = tmp_path_factory.mktemp("users")
    net = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
    cloud, _ = init_cloud(
        tmp / "cloud",
        parse_config(
            {
                "domain": DOMAIN,
                "profile": "cluster",
                "hosts": [
                    # app hosts named like the local servers' node ids (node1, node2)
                    {"name": "edge", "address": f"{net}.1", "roles": ["lb", "db", "cache"]},
                    {"name": "node1", "address": f"{net}.2", "roles": ["app"]},
                    {"name": "node2", "address": f"{net}.3", "roles": ["app"]},
                ],
            }
        ),
    )
    token = cloud.secrets()["imcloud_admin_token"]
    cert, key = _issue_cert(cloud, tmp)
    with Stack(fsync=False, extra_env=FAST) as stack:
        servers = [stack.add_server(IM_ADMIN_TOKEN=token) for _ in range(2)]
        try:
            front = TlsFront(f"{net}.1", [s.port for s in servers], cert, key)
            with front:
                yield cloud
        except PermissionError:
            pytest.skip("binding port 443 needs root")


def test_add_list_disable_through_the_cli(cloud_front: Cloud) -> None:
    base = ["--cloud", str(cloud_front.dir)]
    name = f"alice{random.randint(0, 10**6)}"
    added = runner.invoke(app, ["users", "add", name, "--json", *base])
    assert added.exit_code == 0, added.output
    created = json.loads(added.stdout)
    assert created["username"] == name and len(created["password"]) >= 20

    typed = runner.invoke(
        app, ["users", "add", f"{name}b", "--password-stdin", *base], input="s3cret-pass\n"
    )
    assert typed.exit_code == 0, typed.output
    assert "password" not in typed.stdout

    listed = runner.invoke(app, ["users", "list", "--json", *base])
    assert listed.exit_code == 0, listed.output
    by_name = {u["username"]: u for u in json.loads(listed.stdout)}
    assert not by_name[name]["disabled"]
    assert f"{name}b" in by_name

    disabled = runner.invoke(app, ["users", "disable", name, *base])
    assert disabled.exit_code == 0, disabled.output
    assert f"disabled user {name}" in disabled.stdout
    after = {u["username"]: u for u in users.list_users(cloud_front)}
    assert after[name]["disabled"] and not after[f"{name}b"]["disabled"]

    table = runner.invoke(app, ["users", "list", *base])
    assert name in table.stdout and "disabled" in table.stdout


def test_enable_and_delete_through_the_cli(cloud_front: Cloud) -> None:
    base = ["--cloud", str(cloud_front.dir)]
    name = f"bob{random.randint(0, 10**6)}"
    assert runner.invoke(app, ["users", "add", name, *base]).exit_code == 0
    assert runner.invoke(app, ["users", "disable", name, *base]).exit_code == 0
    enabled = runner.invoke(app, ["users", "enable", name, *base])
    assert enabled.exit_code == 0, enabled.output
    assert f"enabled user {name}" in enabled.stdout
    assert not {u["username"]: u for u in users.list_users(cloud_front)}[name]["disabled"]

    kept = runner.invoke(app, ["users", "delete", name, *base], input="n\n")
    assert kept.exit_code == 1
    assert name in {u["username"] for u in users.list_users(cloud_front)}
    deleted = runner.invoke(app, ["users", "delete", name, "--yes", *base])
    assert deleted.exit_code == 0, deleted.output
    assert f"deleted user {name}" in deleted.stdout
    assert name not in {u["username"] for u in users.list_users(cloud_front)}
    again = runner.invoke(app, ["users", "delete", name, "--yes", *base])
    assert again.exit_code == 1
    assert again.stderr.strip() == f"error: deleting user {name}: no user '{name}' (not_found)"


def test_bad_input_is_one_clear_line_and_changes_nothing(cloud_front: Cloud) -> None:
    base = ["--cloud", str(cloud_front.dir)]
    before = users.list_users(cloud_front)
    cases = [
        (["users", "add", "bad name!", *base], None, "user name 'bad name!'"),
        (["users", "add", "shorty", "--password-stdin", *base], "abc\n", "at least 8"),
        (["users", "disable", "nobody-here", *base], None, "disabling user nobody-here"),
        (["users", "enable", "nobody-here", *base], None, "enabling user nobody-here"),
        (["users", "delete", "nobody-here", "--yes", *base], None, "deleting user nobody-here"),
        (["users", "delete", "bad name!", "--yes", *base], None, "user name 'bad name!'"),
    ]
    for args, stdin, expected in cases:
        result = runner.invoke(app, args, input=stdin)
        assert result.exit_code == 1, result.output
        assert expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    existing = before[0]["username"] if before else None
    if existing:
        dup = runner.invoke(app, ["users", "add", existing, *base])
        assert dup.exit_code == 1 and f"adding user {existing}" in dup.stderr
    assert users.list_users(cloud_front) == before


def test_untrusted_certificate_is_refused(cloud_front: Cloud, tmp_path: Path) -> None:
    """With another CA than the one that signed the front's certificate, nothing goes through."""
    other, _ = init_cloud(
        tmp_path / "other",
        parse_config({"domain": DOMAIN, "hosts": [{"name": "x", "address": "127.0.0.1"}]}),
    )
    original = cloud_front.ca_cert_path.read_bytes()
    try:
        cloud_front.ca_cert_path.write_bytes(other.ca_cert_path.read_bytes())
        with pytest.raises(ImcloudError, match="listing users: TLS certificate .* not trusted"):
            users.list_users(cloud_front)
    finally:
        cloud_front.ca_cert_path.write_bytes(original)


def test_verify_message_check_crosses_app_nodes(cloud_front: Cloud) -> None:
    report = verify.run_verify(cloud_front, extra_args=["-k", "message", "-s"])
    assert [(r.area, r.outcome) for r in report.results] == [("message", "passed")], (
        report.failure_lines(),
        report.log_path.read_text()[-3000:],
    )
    log = report.log_path.read_text()
    assert "delivered node1 -> node2" in log or "delivered node2 -> node1" in log
    # the temporary users are deleted afterwards
    temporary = [u for u in users.list_users(cloud_front) if "imcloud-verify-" in u["username"]]
    assert temporary == []
