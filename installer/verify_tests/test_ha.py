"""Profile ha's shape (docs/ha.md): one Patroni primary with streaming replicas, one of
them synchronous; every Sentinel naming the same master; the floating address on
exactly one load balancer. Asked once over SSH (installer/core/ha_state.py)."""

from __future__ import annotations

import pytest

from installer.core.cloud import Cloud
from installer.core.ha_state import HaState, patroni_problems, probe


@pytest.fixture(scope="module")
def state(cloud: Cloud) -> HaState:
    if cloud.config.profile != "ha":
        pytest.skip(f"profile {cloud.config.profile} has no replicated database or cache")
    return probe(cloud)


def test_one_patroni_primary_and_streaming_replicas_one_synchronous(
    cloud: Cloud, state: HaState
) -> None:
    assert state.patroni is not None, "no db host answered `patronictl list`"
    problems = patroni_problems(state.patroni, [h.name for h in cloud.hosts_in("db")])
    assert not problems, "; ".join(problems)


def test_every_sentinel_names_the_same_redis_master(cloud: Cloud, state: HaState) -> None:
    sentinels = state.sentinels or {}
    assert sorted(sentinels) == sorted(h.name for h in cloud.hosts_in("cache")), sentinels
    masters = set(sentinels.values())
    assert len(masters) == 1 and None not in masters, f"Sentinels name: {sentinels}"


def test_floating_address_on_exactly_one_load_balancer(cloud: Cloud, state: HaState) -> None:
    holders = state.floating_holders or []
    assert len(holders) == 1, f"{cloud.config.ha.floating_address} held by {holders or 'no lb'}"
