"""Every service of each host's roles is running and enabled at boot."""

from __future__ import annotations

from typing import Any

import pytest

from installer.core.cloud import Host
from installer.core.verify import expected_services


@pytest.mark.expand("service", expected_services)
def test_service_running_and_enabled(infra: Any, node: Host, service: str) -> None:
    unit = infra.service(service)
    state = infra.run(f"systemctl is-active {service}").stdout.strip() or "unknown"
    if not (unit.is_running and unit.is_enabled):
        journal = infra.run(f"journalctl -u {service} -n 15 --no-pager").stdout
        enabled = infra.run(f"systemctl is-enabled {service}").stdout.strip() or "unknown"
        pytest.fail(
            f"{service} on {node.name}: {state}, {enabled} at boot\n{journal}", pytrace=False
        )
