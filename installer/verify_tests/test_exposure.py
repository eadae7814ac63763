"""From the controller, which is outside the cluster, no internal port answers.

Every port of the design's internal table and every port the host actually
listens on beyond loopback (except SSH and, on the load balancer, HTTP/HTTPS)
is tried on each address of the host; a completed TCP handshake is a failure.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

from installer.core.cloud import Host
from installer.core.preflight import Listener
from installer.core.verify import INTERNAL_PORTS, public_ports

CONNECT_TIMEOUT_S = 3.0


def _answers(target: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:  # refused, timed out, unreachable: all mean "not reachable"
        return False


def test_internal_ports_unreachable_from_outside(node: Host, listeners: list[Listener]) -> None:
    ports = set(INTERNAL_PORTS) | {x.port for x in listeners}
    ports -= public_ports(node)
    targets = [
        (address, port)
        for address in dict.fromkeys((node.address, node.internal_address))
        for port in sorted(ports)
    ]
    with ThreadPoolExecutor(max_workers=32) as pool:
        open_ = [t for t, ok in zip(targets, pool.map(_answers, targets), strict=True) if ok]
    assert not open_, "reachable from outside the cluster: " + ", ".join(
        f"{a}:{p}" for a, p in open_
    )
