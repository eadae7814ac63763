"""`imcloud quickstart`: a cloud on local lab hosts, from nothing, in one go."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from installer.core.lab import LabHost

LAB_DOMAIN = "chat.imcloud.test"


#: Last octet of the floating address in a lab's /24 (hosts start at .11).
LAB_FLOATING_OCTET = 250


def lab_cloud_config(
    hosts: Sequence[LabHost], domain: str = LAB_DOMAIN, profile: str | None = None
) -> dict[str, Any]:
    """imcloud.yml data for lab hosts.

    Default profile by size. One host: single. Two or three: the first host is
    load balancer, database, cache and monitoring, the others app nodes (with two
    hosts the first is an app node too). Four or more: lb, a data+monitoring
    host, apps. ``profile="ha"`` (three or more hosts): every host is app, db and
    cache, the first two are load balancers sharing the lab's .250 address, the
    last one is the monitoring host.
    """
    if not hosts:
        raise ValueError("no lab hosts")
    if profile == "ha":
        return _ha_lab_config(hosts, domain)
    first = hosts[0]
    layout: list[tuple[LabHost, list[str]]]
    if len(hosts) == 1:
        layout = [(first, [])]
        profile = "single"
    elif len(hosts) <= 3:
        edge = ["lb", "db", "cache", "monitoring"] + (["app"] if len(hosts) == 2 else [])
        layout = [(first, edge), *((h, ["app"]) for h in hosts[1:])]
        profile = "cluster"
    else:
        layout = [
            (first, ["lb"]),
            (hosts[1], ["db", "cache", "monitoring"]),
            *((h, ["app"]) for h in hosts[2:]),
        ]
        profile = "cluster"
    return {
        "domain": domain,
        "profile": profile,
        "ssh": _lab_ssh(first),
        "hosts": [{"name": h.name, "address": h.address, "roles": roles} for h, roles in layout],
    }


def _lab_ssh(host: LabHost) -> dict[str, Any]:
    return {
        "user": host.user,
        "private_key_file": str(host.private_key_file),
        "known_hosts_file": str(host.known_hosts_file),
    }


def _ha_lab_config(hosts: Sequence[LabHost], domain: str) -> dict[str, Any]:
    if len(hosts) < 3:
        raise ValueError(f"profile ha needs three or more lab hosts, got {len(hosts)}")
    subnet = ipaddress.ip_interface(f"{hosts[0].address}/24").network
    layout = []
    for index, host in enumerate(hosts):
        roles = ["app", "db", "cache"]
        if index < 2:
            roles.insert(0, "lb")
        if index == len(hosts) - 1:
            roles.append("monitoring")
        layout.append({"name": host.name, "address": host.address, "roles": roles})
    return {
        "domain": domain,
        "profile": "ha",
        "ha": {"floating_address": str(subnet.network_address + LAB_FLOATING_OCTET)},
        "ssh": _lab_ssh(hosts[0]),
        "hosts": layout,
    }
