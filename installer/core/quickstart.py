"""`imcloud quickstart`: a cloud on local lab hosts, from nothing, in one go."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from installer.core.lab import LabHost

LAB_DOMAIN = "chat.imcloud.test"


def lab_cloud_config(hosts: Sequence[LabHost], domain: str = LAB_DOMAIN) -> dict[str, Any]:
    """imcloud.yml data for lab hosts.

    One host: profile single. Two or three: the first host is load balancer,
    database, cache and monitoring, the others app nodes (with two hosts the
    first is an app node too). Four or more: lb, a data+monitoring host, apps.
    """
    if not hosts:
        raise ValueError("no lab hosts")
    first = hosts[0]
    ssh = {
        "user": first.user,
        "private_key_file": str(first.private_key_file),
        "known_hosts_file": str(first.known_hosts_file),
    }
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
        "ssh": ssh,
        "hosts": [{"name": h.name, "address": h.address, "roles": roles} for h, roles in layout],
    }
