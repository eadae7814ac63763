"""The install progress model follows ansible-runner's event stream."""

from __future__ import annotations

from installer.core.runner import HostState, RunState


def _event(kind: str, host: str | None = None, **data: object) -> dict[str, object]:
    event_data: dict[str, object] = {"play": "App nodes", **data}
    if host:
        event_data["host"] = host
    return {"event": kind, "event_data": event_data}


def test_counts_changes_failures_and_phases() -> None:
    state = RunState(hosts={"app1": HostState("app1"), "app2": HostState("app2")})
    state.apply(_event("playbook_on_task_start", role="common", task="Install packages"))
    state.apply(_event("runner_on_start", "app1", role="common", task="Install packages"))
    state.apply(_event("runner_on_ok", "app1", role="common", res={"changed": True}))
    state.apply(_event("runner_on_ok", "app2", role="common", res={"changed": False}))
    state.apply(_event("runner_on_start", "app2", role="im_server", task="Start service"))
    state.apply(
        _event(
            "runner_on_failed",
            "app2",
            role="im_server",
            task="Start service",
            res={"msg": "Unable to start service imcloud-im-server"},
        )
    )
    state.apply(_event("runner_on_failed", "app1", role="im_server", ignore_errors=True, res={}))
    state.apply(
        _event("runner_on_unreachable", "app1", role="im_server", res={"msg": "ssh: timeout"})
    )

    app1, app2 = state.hosts["app1"], state.hosts["app2"]
    assert (app1.ok, app1.changed, app1.failed, app1.unreachable) == (1, 1, 0, True)
    assert (app2.ok, app2.changed, app2.failed) == (1, 0, 1)
    assert app2.phase == "im_server"
    assert [(f.host, f.message) for f in state.failures] == [
        ("app2", "Unable to start service imcloud-im-server"),
        ("app1", "ssh: timeout"),
    ]
    assert state.changes == [("app1", "")]
    assert set(state.phases) == {"common", "im_server"}
    assert state.phases["common"].finished >= state.phases["common"].started


def test_events_of_unknown_hosts_are_tracked_not_dropped() -> None:
    state = RunState(hosts={})
    state.apply(_event("runner_on_ok", "localhost", res={"changed": True}))
    assert state.hosts["localhost"].changed == 1


def test_a_change_hidden_by_no_log_is_counted_from_the_final_stats() -> None:
    state = RunState(hosts={"db1": HostState("db1"), "db2": HostState("db2")})
    censored = {"censored": "the output has been hidden due to 'no_log: true'"}
    state.apply(_event("runner_on_ok", "db1", role="patroni", task="Set passwords", res=censored))
    state.apply(_event("runner_on_ok", "db2", role="patroni", task="Write", res={"changed": True}))
    assert state.hosts["db1"].changed == 0
    state.apply(_event("playbook_on_stats", changed={"db1": 1, "db2": 1}))
    assert (state.hosts["db1"].changed, state.hosts["db2"].changed) == (1, 1)
    assert state.changes == [
        ("db2", "Write"),
        ("db1", "1 task(s) whose result is hidden (no_log)"),
    ]
