"""Api over HTTPS pinned to an address: name check, basic auth, errors as one line."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from installer.core.status import Api
from installer.errors import ImcloudError

NAME = "chat.example.test"
GOOD = "Basic " + base64.b64encode(b"monitor:right").decode()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.headers.get("Authorization") != GOOD:
            self.send_response(401)
            self.end_headers()
            return
        body = {"status": "success", "data": {"result": [{"path": self.path,
                                                          "host": self.headers["Host"]}]}}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test CA", "-days", "2", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "host.key", "-out", "host.csr", "-subj", f"/CN={NAME}", cwd=d)
    (d / "ext").write_text(f"subjectAltName=DNS:{NAME}\n")
    _openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "host.crt", "-days", "2", "-extfile", "ext", cwd=d)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "host.crt", d / "host.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1]), d / "ca.crt"
    server.shutdown()
    server.server_close()


def test_pinned_https_checks_the_name_and_sends_auth(https_server: tuple[int, Path]) -> None:
    port, ca = https_server
    api = Api(f"https://{NAME}:{port}/prometheus", auth=("monitor", "right"), ca_file=ca,
              connect_to="127.0.0.1")
    result = api.query("up == 0")
    assert result == [{"path": "/prometheus/api/v1/query?query=up%20%3D%3D%200",
                       "host": f"{NAME}:{port}"}]


def test_wrong_password_and_wrong_name_are_one_line_errors(
    https_server: tuple[int, Path],
) -> None:
    port, ca = https_server
    wrong = Api(f"https://{NAME}:{port}/prometheus", auth=("monitor", "wrong"), ca_file=ca,
                connect_to="127.0.0.1")
    with pytest.raises(ImcloudError, match="HTTP 401"):
        wrong.get_text("/-/ready")
    other = Api(f"https://other.example.test:{port}/prometheus", auth=("monitor", "right"),
                ca_file=ca, connect_to="127.0.0.1")
    with pytest.raises(ImcloudError, match="certificate") as caught:
        other.get_text("/-/ready")
    assert "\n" not in str(caught.value)
