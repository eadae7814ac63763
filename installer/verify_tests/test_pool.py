"""Every app node is in the pool of every load balancer: nginx sends requests to each.

nginx balances requests round robin over its upstreams, so a few rounds of
``GET /healthz`` (which names the node that answered) through a load balancer
reach every live app node. On profile ha each lb host is asked directly as well
as through the floating address: the standby must be ready to take over.
"""

from __future__ import annotations

import pytest

from installer.core.cloud import Cloud
from installer.core.verify import https_request

ROUNDS = 4


def _entry_points(cloud: Cloud) -> list[str]:
    points = [cloud.lb_address]
    if cloud.config.profile == "ha":
        points += [h.address for h in cloud.hosts_in("lb")]
    return points


@pytest.mark.parametrize("entry", ["public", "each-lb"])
def test_every_app_node_answers_through_the_load_balancer(cloud: Cloud, entry: str) -> None:
    points = _entry_points(cloud)
    if entry == "each-lb":
        if cloud.config.profile != "ha":
            pytest.skip("one load balancer: the public check covers it")
        points = points[1:]
    else:
        points = points[:1]
    expected = {h.name for h in cloud.hosts_in("app")}
    for address in points:
        answered = set()
        for _ in range(ROUNDS * len(expected)):
            status, body = https_request(cloud, "GET", "/healthz", address=address, timeout=10)
            assert status == 200, f"GET /healthz at {address}: HTTP {status}"
            answered.add(body["node"])
        missing = sorted(expected - answered)
        assert not missing, f"through {address}: app node(s) {missing} never answered"
