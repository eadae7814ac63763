"""HTTPS on the load balancer: chain valid for the domain, not expiring soon, HTTP redirects."""

from __future__ import annotations

import datetime as dt
import http.client
import ssl
from typing import Any

import pytest

from installer.core.cloud import Cloud
from installer.core.verify import peer_certificate

MIN_VALIDITY = dt.timedelta(days=14)


@pytest.fixture(scope="module")
def peer_cert(cloud: Cloud) -> dict[str, Any]:
    """The handshake verifies the chain against the cloud's CA and the name against the domain."""
    cert, version = peer_certificate(cloud)
    assert version in ("TLSv1.2", "TLSv1.3"), f"negotiated {version}"
    return cert


def test_certificate_chain_valid_for_domain(peer_cert: dict[str, Any]) -> None:
    # the handshake above verified chain and host name; fail here if it did not
    assert peer_cert["subject"]


def test_certificate_not_expiring_within_14_days(peer_cert: dict[str, Any]) -> None:
    expires = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(peer_cert["notAfter"]), dt.UTC)
    left = expires - dt.datetime.now(dt.UTC)
    assert left > MIN_VALIDITY, f"certificate expires {expires:%Y-%m-%d} ({left.days} days left)"


def test_http_redirects_to_https(cloud: Cloud) -> None:
    conn = http.client.HTTPConnection(cloud.lb_address, 80, timeout=10)
    try:
        conn.request("GET", "/healthz", headers={"Host": cloud.config.domain})
        response = conn.getresponse()
    finally:
        conn.close()
    assert response.status in (301, 308), response.status
    assert response.getheader("Location", "").startswith(f"https://{cloud.config.domain}/")
