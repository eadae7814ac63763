"""`imcloud status` on profile ha: who is primary, sync standby and Redis master."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from installer.commands.status import _ha_table
from installer.core.status import FIGURES, HaRoles, ha_roles

NAMES = {"10.0.0.1": "node1", "10.0.0.2": "node2", "10.0.0.3": "node3"}


def _sample(**labels: str) -> dict[str, Any]:
    return {"metric": labels, "value": [1700000000.0, "1"]}


def _patroni(address: str) -> dict[str, Any]:
    return _sample(job="patroni", instance=f"{address}:8008", scope="imcloud")


def _sentinel(address: str, master: str) -> dict[str, Any]:
    return _sample(job="sentinel", instance=f"{address}:9122", master_name="imcloud",
                   master_address=f"{master}:6379", master_status="ok")  # fmt: skip


def test_the_healthy_shape_names_one_of_each() -> None:
    roles = ha_roles(
        [_patroni("10.0.0.2")],
        [_patroni("10.0.0.3")],
        [_sentinel(a, "10.0.0.1") for a in ("10.0.0.3", "10.0.0.1", "10.0.0.2")],
        NAMES,
    )
    assert roles == HaRoles(
        postgres_primary=["node2"],
        postgres_sync_standby=["node3"],
        redis_master={"node1": ["node1", "node2", "node3"]},
    )
    assert roles.problems == []
    assert roles.as_dict() == {
        "postgres_primary": ["node2"],
        "postgres_sync_standby": ["node3"],
        "redis_master": {"node1": ["node1", "node2", "node3"]},
        "problems": [],
    }


def test_none_or_several_are_problems_in_words() -> None:
    roles = ha_roles(
        [_patroni("10.0.0.1"), _patroni("10.0.0.2")],
        [],
        [_sentinel("10.0.0.1", "10.0.0.1"), _sentinel("10.0.0.2", "10.0.0.2"),
         _sentinel("10.0.0.3", "10.0.0.2")],
        NAMES,
    )  # fmt: skip
    assert roles.redis_master == {"node1": ["node1"], "node2": ["node2", "node3"]}
    assert roles.problems == [
        "2 PostgreSQL primaries (Patroni): node1, node2",
        "0 synchronous standbys (Patroni)",
        "the Sentinels name 2 Redis masters: node1 by node1; node2 by node2, node3",
    ]
    lost = ha_roles([], [], [], NAMES)
    assert lost.problems[-1] == "no Sentinel sees a reachable Redis master"
    assert lost.as_dict()["redis_master"] == {}


def test_an_address_outside_the_cloud_is_shown_as_is() -> None:
    roles = ha_roles([_patroni("[fd00::9]")], [], [_sentinel("10.0.0.1", "10.9.9.9")], NAMES)
    assert roles.postgres_primary == ["fd00::9"]
    assert roles.redis_master == {"10.9.9.9": ["node1"]}


def test_patroni_rows_show_each_member_s_role() -> None:
    (_, _, role), = [f for f in FIGURES["patroni"] if f[0] == "role"]
    assert [role(v) for v in (2.0, 1.0, 0.0)] == ["primary", "sync standby", "replica"]


def test_the_table_names_holders_and_problems() -> None:
    console = Console(width=200, record=True)
    roles = HaRoles(["node2"], [], {"node1": ["node1", "node3"], "node2": ["node2"]})
    console.print(_ha_table(roles))
    text = console.export_text()
    assert "PostgreSQL primary" in text and "node2" in text
    assert "Sentinels node1, node3" in text
    assert "0 synchronous standbys (Patroni)" in text
    assert "the Sentinels name 2 Redis masters" in text
    console.print(_ha_table(HaRoles([], [], {})))
    assert "no Sentinel sees a reachable Redis master" in console.export_text()
