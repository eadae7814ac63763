"""Listening sockets as designed: internal ports on the internal address only, and
nothing on a public address but SSH (and HTTP/HTTPS on the load balancer)."""

from __future__ import annotations

import ipaddress

from installer.core.cloud import Cloud, Host
from installer.core.preflight import Listener
from installer.core.verify import internal_ports, public_ports

WILDCARDS = {"0.0.0.0", "::", "*"}


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _show(listeners: list[Listener]) -> str:
    return ", ".join(f"{x.address}:{x.port} ({'/'.join(x.processes) or '?'})" for x in listeners)


def test_public_services_listen(node: Host, listeners: list[Listener]) -> None:
    ports = {x.port for x in listeners}
    missing = sorted(public_ports(node) - ports)
    assert not missing, f"nothing listens on public port(s) {missing}"


def test_internal_ports_bound_to_internal_address(
    cloud: Cloud, node: Host, listeners: list[Listener]
) -> None:
    problems = []
    for port in sorted(internal_ports(cloud, node)):
        on_port = [x for x in listeners if x.port == port]
        if not any(x.address == node.internal_address for x in on_port):
            problems.append(f"{port} not listening on {node.internal_address}")
        wrong = [
            x for x in on_port if x.address != node.internal_address and not _loopback(x.address)
        ]
        if wrong:
            problems.append(f"{port} also bound to {_show(wrong)}")
    assert not problems, "; ".join(problems)


def test_nothing_else_listens_beyond_loopback(
    cloud: Cloud, node: Host, listeners: list[Listener]
) -> None:
    public = public_ports(node)
    internal = internal_ports(cloud, node)
    unexpected = [
        x
        for x in listeners
        if not _loopback(x.address)
        and x.port not in public
        and not (x.port in internal and x.address == node.internal_address)
    ]
    assert not unexpected, f"unexpected listeners: {_show(unexpected)}"
